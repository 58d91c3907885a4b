# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""fastedge's own socket I/O: asyncio transports for plain TCP, driven by one epoll set.

Why: under load a plain proxied request costs two reads and two writes in the kernel,
and around each of them uvloop runs its generic machinery: a libuv callback, a context
switch into the protocol's ``contextvars`` context, a Python-level call, a write queue
check. Measured on the express lane that machinery is most of what separates fastedge
from nginx (bench/RESULTS.md, sessions 16-18). Here every plain TCP connection of the
proxy (client side and upstream pool) is a file descriptor in one epoll set of our own;
the set's descriptor is registered with the event loop (``loop.add_reader``) so one loop
callback drains every ready socket, and each read is one ``recv`` into a shared buffer
and one call of the protocol's ``data_received``.

The transports implement the asyncio transport contract the proxy relies on, with
asyncio's semantics (the specification: ``asyncio.selector_events`` and uvloop's
``UVStream``): writes go to the socket at once and only what the kernel does not take
is buffered (flow control with ``pause_writing``/``resume_writing`` at the high and low
water marks, 64 KiB / 16 KiB by default); ``close`` flushes then closes;
``connection_lost`` is called soon after the socket is closed, once; ``eof_received``
returning false closes; an exception escaping a protocol callback is reported to the
loop's exception handler and aborts the connection.

There is no pure-Python twin: the event loop's own transports are the fallback (and the
reference the tests compare against), chosen by ``fastedge.transports``.
Linux only (epoll, ``accept4``).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, ECONNRESET, EINPROGRESS, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, errno
from libc.string cimport strerror

import os as _os
import socket as _socket

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct sockaddr_storage:
        unsigned short ss_family
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *alen, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t n)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *n)
    enum:
        MSG_NOSIGNAL
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
        AF_INET
        AF_INET6

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int n)

# One read buffer for every connection: the loop is single-threaded and each read's bytes
# are copied into a bytes object before the protocol sees them (as uvloop does).
cdef enum:
    READ_SIZE = 262144
    MAX_EVENTS = 256
    MAX_IOV = 64
    ACCEPT_BURST = 128
    # asyncio's defaults (selector_events, uvloop): pause the protocol above 64 KiB.
    HIGH_WATER = 65536

cdef char _read_buf[READ_SIZE]
# Not registered in the epoll set (closed, or a stopped listener). 0 means registered
# but parked: deleted from the set while paused after a hang-up (see on_event).
cdef unsigned int UNREGISTERED = 0xFFFFFFFF
ACCEPT_RETRY_DELAY = 1.0  # asyncio's pause after EMFILE and friends


cdef object _oserror(int err):
    return OSError(err, strerror(err).decode())


cdef object _connection_error(int err):
    """The exception asyncio raises for ``err`` (ConnectionResetError and friends)."""
    return OSError(err, strerror(err).decode())  # OSError() picks the subclass by errno


cdef class _Handler:
    """Something registered in the epoll set: a listener or a connection."""

    cdef int fd
    cdef unsigned int mask  # the events it is registered for (UNREGISTERED: none)
    cdef bint parked  # out of the set for now (a hang-up while paused; see on_event)
    cdef EdgeLoop edge

    cdef int on_event(self, unsigned int events) except -1:
        return 0


cdef class EdgeLoop:
    """The epoll set of one event loop, drained by one ``add_reader`` callback."""

    cdef int epfd
    cdef readonly object loop
    cdef set live  # registered handlers: the epoll set holds borrowed pointers to them
    cdef list dying  # unregistered during a batch: kept alive until the batch ends
    cdef epoll_event events[MAX_EVENTS]
    cdef bint closed

    def __cinit__(self, loop):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _oserror(errno)
        self.loop = loop
        self.live = set()
        self.dying = []
        self.closed = False
        loop.add_reader(self.epfd, self._poll)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    @property
    def connections(self):
        """How many connections and listeners are registered."""
        return len(self.live)

    def close(self):
        """Stop polling (registered sockets stay open: their owners close them)."""
        if self.closed:
            return
        self.closed = True
        if not self.loop.is_closed():
            self.loop.remove_reader(self.epfd)

    cdef int _ctl(self, int op, _Handler h, unsigned int mask) except -1:
        """Add ``h`` to the set or change its events (``op``); it is then in the set."""
        cdef epoll_event ev
        ev.events = mask
        ev.data.ptr = <void *>h
        if epoll_ctl(self.epfd, op, h.fd, &ev) < 0:
            raise _oserror(errno)
        h.mask = mask
        h.parked = False
        return 0

    cdef int register(self, _Handler h, unsigned int mask) except -1:
        self._ctl(EPOLL_CTL_ADD, h, mask)
        self.live.add(h)
        return 0

    cdef int modify(self, _Handler h, unsigned int mask) except -1:
        cdef int op = EPOLL_CTL_MOD
        if h.fd < 0 or h.mask == UNREGISTERED:
            return 0
        if h.parked:
            if mask == 0:
                return 0  # stays out until it wants events again
            op = EPOLL_CTL_ADD
        elif h.mask == mask:
            return 0
        # A mask of 0 keeps the descriptor in the set: epoll still reports errors and
        # hang-ups for it (a reset while reading is paused must not go unnoticed).
        return self._ctl(op, h, mask)

    cdef void park(self, _Handler h) noexcept:
        """Take ``h`` out of the set but keep it alive (``modify`` puts it back)."""
        cdef epoll_event ev
        if h.mask != UNREGISTERED and not h.parked:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, h.fd, &ev)
            h.parked = True
            h.mask = 0

    cdef void unregister(self, _Handler h) noexcept:
        cdef epoll_event ev
        if h.mask == UNREGISTERED:
            return
        if not h.parked:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, h.fd, &ev)
        h.parked = False
        h.mask = UNREGISTERED
        # An event for it may still be in the batch being dispatched.
        self.dying.append(h)
        self.live.discard(h)

    def _poll(self):
        cdef int n, i
        cdef _Handler h
        if self.closed:
            return
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        if n < 0:
            if errno == EINTR:
                return
            raise _oserror(errno)
        try:
            for i in range(n):
                h = <_Handler>self.events[i].data.ptr
                if h.fd >= 0 and h.mask != UNREGISTERED:
                    h.on_event(self.events[i].events)
        finally:
            if self.dying:
                self.dying = []


cdef class EdgeTransport(_Handler):
    """One TCP connection as an asyncio transport (see the module docstring)."""

    cdef object protocol
    cdef object on_data  # protocol.data_received, bound once per protocol
    cdef bint reading  # the protocol wants data (EPOLLIN is dropped lazily when not)
    cdef bint closing
    cdef bint eof_pending  # write_eof() once the buffer is flushed
    cdef bint eof_written
    cdef bint proto_paused
    cdef bint lost_scheduled
    cdef list wbuf
    cdef Py_ssize_t wsize
    cdef Py_ssize_t high
    cdef Py_ssize_t low
    cdef object peer_raw  # accept4's sockaddr bytes, then (on demand) its decoded tuple
    cdef dict extra
    cdef object sock  # a socket object over fd, made on demand (get_extra_info)
    cdef object waiter  # the connect future, while connecting
    cdef bint made  # connection_made was called (then connection_lost always follows)

    def __cinit__(self):
        self.fd = -1
        self.mask = UNREGISTERED
        self.reading = True
        self.wbuf = []
        self.high = HIGH_WATER
        self.low = HIGH_WATER // 4

    def __dealloc__(self):
        # Never closed (its loop went away first): release the descriptor at least. A
        # registered transport cannot get here while its EdgeLoop lives (``live``).
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    # --- asyncio.BaseTransport ----------------------------------------------------------
    def get_extra_info(self, name, default=None):
        """``peername``, ``sockname``, ``socket``; anything else is ``default``."""
        if name == "peername" and self.peer_raw is not None:
            # Accepted connections: accept4's address, decoded once and kept in place of
            # the raw bytes (no per-connection dict: the proxy asks once per connection).
            if type(self.peer_raw) is bytes:
                self.peer_raw = _decode_sockaddr(self.peer_raw)
            return self.peer_raw
        if self.extra is not None and name in self.extra:
            return self.extra[name]
        if name in ("peername", "sockname", "socket") and self.fd >= 0:
            sock = self._socket()
            try:
                value = (
                    sock if name == "socket"
                    else sock.getpeername() if name == "peername"
                    else sock.getsockname()
                )
            except OSError:
                return default
        else:
            return default
        if self.extra is None:
            self.extra = {}
        self.extra[name] = value
        return value

    cdef object _socket(self):
        if self.sock is None:
            # A socket object on a duplicate of the descriptor: closing it (or its
            # finaliser) never closes ours. Options set through it apply to the same
            # socket. The duplicate is closed with the transport.
            self.sock = _socket.socket(fileno=_os.dup(self.fd))
        return self.sock

    def is_closing(self):
        return self.closing

    def close(self):
        """Stop reading; close once everything buffered is written."""
        if self.closing:
            return
        self.closing = True
        self.reading = False
        if self.wsize == 0:
            self._finish(None)

    def abort(self):
        """Close now; buffered data is dropped."""
        self._force_close(None)

    def set_protocol(self, protocol):
        self._use(protocol)

    cdef int _use(self, protocol) except -1:
        self.protocol = protocol
        # Bound once: a read then costs one call, not a method lookup and a call.
        self.on_data = getattr(protocol, "data_received", None)
        return 0

    def get_protocol(self):
        return self.protocol

    # --- asyncio.ReadTransport ----------------------------------------------------------
    def is_reading(self):
        return self.reading and not self.closing

    def pause_reading(self):
        # Lazily: EPOLLIN leaves the set only if data arrives while paused, so the
        # common pause-then-resume costs no system call.
        if self.closing:
            return
        self.reading = False

    def resume_reading(self):
        if self.closing or self.reading:
            return
        self.reading = True
        if self.fd >= 0 and not (self.mask & EPOLLIN):
            self.edge.modify(self, (self.mask & EPOLLOUT) | EPOLLIN)

    # --- asyncio.WriteTransport ---------------------------------------------------------
    def write(self, data):
        cdef Py_ssize_t n, size
        cdef int err
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"data argument must be a bytes-like object, not {type(data).__name__!r}"
                )
            data = bytes(data)  # the caller may mutate a bytearray after we return
        if self.eof_pending or self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        size = PyBytes_GET_SIZE(data)
        if size == 0:
            return
        if self.fd < 0:
            return  # as asyncio: writes after the connection is gone are dropped
        if self.wsize == 0:
            n = send(self.fd, PyBytes_AS_STRING(data), size, MSG_NOSIGNAL)
            if n == size:
                return
            if n < 0:
                err = errno
                if err != EAGAIN and err != EINTR:
                    self._force_close(_connection_error(err))
                    return
                n = 0
            data = data[n:]
            size -= n
            self.wbuf.append(data)
            self.wsize = size
            self.edge.modify(self, self.mask | EPOLLOUT)
        else:
            self.wbuf.append(data)
            self.wsize += size
        self._maybe_pause()

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    def write_eof(self):
        if self.eof_pending or self.eof_written or self.closing:
            return
        if self.wsize:
            self.eof_pending = True
            return
        self.eof_written = True
        if self.fd >= 0:
            shutdown(self.fd, SHUT_WR)

    def can_write_eof(self):
        return True

    def get_write_buffer_size(self):
        return self.wsize

    def get_write_buffer_limits(self):
        return (self.low, self.high)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 4 * low if low is not None else HIGH_WATER
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high = high
        self.low = low
        self._maybe_pause()

    # --- internals ----------------------------------------------------------------------
    cdef int _maybe_pause(self) except -1:
        if not self.proto_paused and self.wsize > self.high:
            self.proto_paused = True
            try:
                self.protocol.pause_writing()
            except Exception as exc:
                self._report(exc, "protocol.pause_writing() failed")
        return 0

    cdef int on_event(self, unsigned int events) except -1:
        if self.waiter is not None:
            self._connected(events)
            return 0
        if events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and self.wsize:
            self._flush()
            if self.fd < 0:
                return 0
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            if self.reading and not self.closing:
                self._read()
            elif events & EPOLLERR:
                # A reset while paused: epoll reports it whatever the mask, so act now.
                self._force_close(_connection_error(self._so_error() or ECONNRESET))
            elif events & EPOLLHUP:
                # Both directions shut while paused (reported whatever the mask): leave
                # the set; resume_reading puts it back and reads what is left.
                self.edge.park(self)
            elif self.mask & EPOLLIN:
                # Paused (or closing): stop the level-triggered wake-ups until resumed.
                self.edge.modify(self, self.mask & ~EPOLLIN)
        return 0

    cdef int _so_error(self) noexcept:
        cdef int err = 0
        cdef socklen_t n = sizeof(err)
        if getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
            return errno
        return err

    cdef int _read(self) except -1:
        cdef ssize_t n = recv(self.fd, _read_buf, READ_SIZE, 0)
        cdef int err
        if n > 0:
            data = PyBytes_FromStringAndSize(_read_buf, n)
            try:
                self.on_data(data)
            except Exception as exc:
                self._fatal(exc, "Fatal error: protocol.data_received() call failed.")
            return 0
        if n == 0:
            self.reading = False
            self.edge.modify(self, self.mask & ~EPOLLIN)
            try:
                keep_open = self.protocol.eof_received()
            except Exception as exc:
                self._fatal(exc, "Fatal error: protocol.eof_received() call failed.")
                return 0
            if not keep_open:
                self.close()
            return 0
        err = errno
        if err == EAGAIN or err == EINTR:
            return 0
        self._force_close(_connection_error(err))
        return 0

    cdef int _flush(self) except -1:
        cdef iovec iov[MAX_IOV]
        cdef int count = 0, err
        cdef Py_ssize_t n, left
        cdef list buf = self.wbuf
        for item in buf:
            if count == MAX_IOV:
                break
            iov[count].iov_base = PyBytes_AS_STRING(item)
            iov[count].iov_len = PyBytes_GET_SIZE(item)
            count += 1
        n = writev(self.fd, iov, count)
        if n < 0:
            err = errno
            if err == EAGAIN or err == EINTR:
                return 0
            self._force_close(_connection_error(err))
            return 0
        self.wsize -= n
        # Drop what was written: whole items, then the head of a partly written one.
        left = n
        count = 0
        for item in buf:
            if left < PyBytes_GET_SIZE(item):
                break
            left -= PyBytes_GET_SIZE(item)
            count += 1
        del buf[:count]
        if left:
            buf[0] = buf[0][left:]
        if self.proto_paused and self.wsize <= self.low:
            self.proto_paused = False
            try:
                self.protocol.resume_writing()
            except Exception as exc:
                self._report(exc, "protocol.resume_writing() failed")
            if self.fd < 0:
                return 0
        if self.wsize == 0:
            if self.closing:
                self._finish(None)
                return 0
            self.edge.modify(self, self.mask & ~EPOLLOUT)
            if self.eof_pending:
                self.eof_pending = False
                self.eof_written = True
                shutdown(self.fd, SHUT_WR)
        return 0

    cdef int _connected(self, unsigned int events) except -1:
        cdef int err = self._so_error()
        waiter = self.waiter
        if waiter.cancelled() or err:
            # Never connected: no connection_lost for a protocol that was never made.
            self.protocol = None
            self.on_data = None
            self.waiter = None
            self._force_close(None)
            if err and not waiter.done():
                waiter.set_exception(_connection_error(err))
            return 0
        self.waiter = None
        self.edge.modify(self, EPOLLIN)
        self.made = True
        try:
            self.protocol.connection_made(self)
        except Exception as exc:
            self._fatal(exc, "Fatal error: protocol.connection_made() call failed.")
            if not waiter.done():
                waiter.set_exception(exc)
            return 0
        if not waiter.done():  # (connection_made may have cancelled the connect)
            waiter.set_result(None)
        return 0

    cdef void _report(self, exc, str message) noexcept:
        try:
            self.edge.loop.call_exception_handler(
                {"message": message, "exception": exc, "transport": self,
                 "protocol": self.protocol}
            )
        except Exception:
            pass

    cdef int _fatal(self, exc, str message) except -1:
        # Connection errors are the peer's doing, not a bug: asyncio does not log them.
        if not isinstance(exc, OSError):
            self._report(exc, message)
        self._force_close(exc)
        return 0

    cdef int _force_close(self, exc) except -1:
        self.wbuf = []
        self.wsize = 0
        self.closing = True
        self.reading = False
        self._finish(exc)
        return 0

    cdef int _finish(self, exc) except -1:
        """Close the descriptor; ``connection_lost`` follows on the next loop pass."""
        if self.fd < 0:
            return 0
        if self.mask != UNREGISTERED:
            self.edge.unregister(self)
        close(self.fd)
        if self.sock is not None:
            self.sock.close()
        self.fd = -1
        self.wbuf = []
        self.wsize = 0
        if self.waiter is not None:
            # Closed while connecting: the waiting connect fails.
            waiter = self.waiter
            self.waiter = None
            if not waiter.done():
                waiter.set_exception(ConnectionAbortedError("connection closed while connecting"))
            return 0
        if not self.lost_scheduled and self.protocol is not None:
            self.lost_scheduled = True
            self.edge.loop.call_soon(self._lost, exc)
        return 0

    def _lost(self, exc):
        try:
            self.protocol.connection_lost(exc)
        finally:
            self.protocol = None
            self.on_data = None

    def __repr__(self):
        state = "closed" if self.fd < 0 else "closing" if self.closing else "open"
        return f"<EdgeTransport fd={self.fd} {state}>"


cdef object _decode_sockaddr(bytes raw):
    """accept4's address as Python's socket module reports it."""
    cdef const char *p = PyBytes_AS_STRING(raw)
    cdef unsigned short family = (<sockaddr *>p).sa_family
    if family == AF_INET and len(raw) >= 8:
        port = (<unsigned char>p[2] << 8) | <unsigned char>p[3]
        return (_socket.inet_ntop(_socket.AF_INET, raw[4:8]), port)
    if family == AF_INET6 and len(raw) >= 28:
        port = (<unsigned char>p[2] << 8) | <unsigned char>p[3]
        flowinfo = int.from_bytes(raw[4:8], "big")
        scope = int.from_bytes(raw[24:28], "little")
        return (_socket.inet_ntop(_socket.AF_INET6, raw[8:24]), port, flowinfo, scope)
    return None


cdef class _Listener(_Handler):
    """A listening socket: accepts in bursts, one transport and protocol per connection."""

    cdef object factory
    cdef object sock
    cdef object retry_handle
    cdef bint nodelay

    cdef int on_event(self, unsigned int events) except -1:
        cdef sockaddr_storage addr
        cdef socklen_t alen
        cdef int fd, err, one = 1
        cdef int i
        cdef EdgeTransport t
        for i in range(ACCEPT_BURST):
            alen = sizeof(addr)
            fd = accept4(self.fd, <sockaddr *>&addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN:
                    return 0
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # Out of descriptors or memory: asyncio's answer, stop accepting for
                    # a moment (the backlog holds the clients) rather than spin.
                    self.edge.loop.call_exception_handler({
                        "message": "socket.accept() out of system resource",
                        "exception": _oserror(err),
                    })
                    self.edge.unregister(self)
                    self.retry_handle = self.edge.loop.call_later(
                        ACCEPT_RETRY_DELAY, self._resume
                    )
                    return 0
                continue  # ECONNABORTED, EPROTO, a peer gone before we took it: next
            if self.nodelay:
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            t = EdgeTransport.__new__(EdgeTransport)
            t.fd = fd
            t.edge = self.edge
            t.peer_raw = PyBytes_FromStringAndSize(<char *>&addr, alen)
            try:
                t._use(self.factory())
            except Exception as exc:
                close(fd)
                t.fd = -1
                self.edge.loop.call_exception_handler(
                    {"message": "protocol factory failed", "exception": exc}
                )
                continue
            self.edge.register(t, EPOLLIN)
            try:
                t.protocol.connection_made(t)
            except Exception as exc:
                t._fatal(exc, "Fatal error: protocol.connection_made() call failed.")
        return 0

    def _resume(self):
        self.retry_handle = None
        if self.fd >= 0 and not self.edge.closed:
            self.edge.register(self, EPOLLIN)

    cdef void stop(self) noexcept:
        if self.retry_handle is not None:
            self.retry_handle.cancel()
            self.retry_handle = None
        if self.mask != UNREGISTERED:
            self.edge.unregister(self)
        self.fd = -1


class EdgeServer:
    """What ``loop.create_server`` returns, for listeners served by an :class:`EdgeLoop`.

    Owns its sockets: :meth:`close` stops accepting and closes them; connections already
    accepted are the protocols' to close (as with asyncio's servers).
    """

    def __init__(self, edge, factory, sockets):
        self._edge = edge
        self._listeners = []
        self.sockets = list(sockets)
        for sock in self.sockets:
            sock.setblocking(False)
            listener = _Listener.__new__(_Listener)
            listener_init(listener, edge, factory, sock)
            self._listeners.append(listener)

    def is_serving(self):
        return bool(self._listeners)

    def get_loop(self):
        return self._edge.loop

    def close(self):
        """Stop accepting and close the listening sockets."""
        for listener in self._listeners:
            listener_stop(listener)
        self._listeners = []
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self):
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


def listener_init(_Listener listener, EdgeLoop edge, factory, sock):
    listener.edge = edge
    listener.factory = factory
    listener.sock = sock
    listener.fd = sock.fileno()
    listener.nodelay = sock.family in (_socket.AF_INET, _socket.AF_INET6)
    edge.register(listener, EPOLLIN)


def listener_stop(_Listener listener):
    listener.stop()


async def open_connection(EdgeLoop edge, protocol_factory, host, int port):
    """Connect to ``host`` (a numeric IPv4/IPv6 address) and ``port``; ``(transport,
    protocol)`` once connected, as ``loop.create_connection`` returns them."""
    cdef EdgeTransport t
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
    except BaseException:
        sock.close()
        raise
    if err not in (0, EINPROGRESS):
        sock.close()
        raise _connection_error(err)
    t = EdgeTransport.__new__(EdgeTransport)
    t.edge = edge
    t.fd = sock.detach()
    t._use(protocol_factory())
    waiter = edge.loop.create_future()
    t.waiter = waiter
    edge.register(t, EPOLLOUT)
    try:
        await waiter
    except BaseException:
        if t.made:
            # Connected (connection_made ran), then our caller was cancelled before it
            # resumed: close it as any connection, connection_lost included.
            t._force_close(None)
            raise
        # Cancelled while connecting (a connect timeout) or refused: the descriptor goes
        # with it, and the protocol, never connected, hears nothing.
        t.protocol = None
        t.on_data = None
        t.waiter = None
        t._force_close(None)
        raise
    return t, t.protocol
