"""What runs inside every serving instance: the app loader, the lock helper, log-file handling.

Standard library, filelock and uwsgi only. User code needs just ``locked``::

    from mlserve_runtime import locked

    with locked(path):  # two uWSGI workers may write the same file
        ...
"""

from .lock import locked

__all__ = ["locked"]
