"""``osmf dashboard``: the read-only CTR drift dashboard (Dash/Plotly), see docs/dashboard.md.

``layout.py`` builds the page and its figures, ``data.py`` reads the stores
(Kafka topics, the worker's tables and metrics, the round log, serving's
state, the creative cache), ``server.py`` starts it. Dash is imported only
when the command runs, so ``osmf --help`` stays instant.
"""
