# errors.pxi - C error codes (-errno) to Python exceptions, in one place.
import errno as _errno
import os as _os

cdef object convert_errno(int rc, str what=""):
    """OSError subclass for a negative errno returned by a lb_* function."""
    cdef int e = -rc
    msg = _os.strerror(e)
    if what:
        msg = f"{what}: {msg}"
    if e == _errno.EINVAL:
        return ValueError(msg)
    if e == _errno.ENOMEM:
        return MemoryError(msg)
    return OSError(e, msg)
