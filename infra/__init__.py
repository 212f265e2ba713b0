"""Ground floor: settings, process helpers, the embedded broker and S3 store, Kafka I/O, wire contracts. Imports no other room."""
