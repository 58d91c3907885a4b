# Cython declarations for fastedge/upstream/pool.py (compiled in pure-Python mode): the
# pool and its bookkeeping as C structs, since the express lane checks a connection out
# (take_idle) and back in (give_back) for every request.

cimport cython


cdef class PooledBase:
    cdef public object transport
    cdef public bint _dead
    cpdef bint is_usable(self) except -1


@cython.locals(base=PooledBase)
cdef bint _usable(object conn) except -1


cdef class PoolState:
    cdef public Py_ssize_t max_connections, busy
    cdef public double idle_timeout
    cdef public list idle
    cdef public object waiters


cdef class ConnectionPool:
    cdef public str name
    cdef public PoolState state
    cdef public double wait_timeout, connect_timeout
    cdef public object _connect, _loop, _expire_handle
    cdef public bint _closed, _draining
    @cython.locals(state=PoolState, idle=list)
    cpdef object take_idle(self)
    @cython.locals(state=PoolState)
    cpdef give_back(self, conn, bint reusable)
