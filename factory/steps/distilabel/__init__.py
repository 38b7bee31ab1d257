"""The ``distilabel`` step (``distilabel.py``) and its view of distilabel's task library (``tasks.py``)."""
