"""Python-backend model code that runs *inside* Triton (``triton_python_backend_stub``, the numpy<2 environment).

Each module here is copied as ``model.py`` into a version directory of the
generated model repository (:mod:`serving.repository`); the rest of
``serving`` imports only ``creative``'s parameter parsing (so the client reads
the routing exactly as ``creative`` does). They import ``triton_python_backend_utils``
(provided by the stub) and the project's code vendored beside them in
``<model>/osmf_code/``.
"""
