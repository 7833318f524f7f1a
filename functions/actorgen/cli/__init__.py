"""The operator command line (``actorgen``, a console script; ``python -m actorgen.cli``).

Never imported by ``functions/main.py``: the functions' cold start does not pay for it.
"""
