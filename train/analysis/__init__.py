"""The code behind ``notebooks/``: find a run, read its bundle and data, and draw what the notebooks show.

The notebooks only call these functions (tests call them too, on a small run), so a notebook cell stays one line
and its logic is reviewed and tested like the rest of the package.
"""
