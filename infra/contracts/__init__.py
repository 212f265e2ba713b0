"""Wire contracts every room reads: event schemas, pair/alert/dead-letter messages, the creative-prompt grammar."""
