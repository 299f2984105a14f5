"""The graph passes: discovery (`discover.py`: capture -> find -> replay -> select) and the two rewrites
(`swap_modules.py` for nn.Module users, `insert_ops.py` for GraphModules) with their checks and links
(`check_calls.py`, `find_siblings.py`, `find_rows.py`), one pass per file; `targets.py` holds the values they hand
each other (Target, Skip, PassReport, Plan). Never imports `export/`."""
