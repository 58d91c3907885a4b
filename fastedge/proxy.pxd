# Cython declarations for fastedge/proxy.py, compiled in pure-Python mode (setup.py).
# The .py file stays the readable source and runs unchanged when not compiled
# (FASTEDGE_NO_EXTENSIONS=1); these declarations make the hot classes C structs, so
# attribute access and calls between them skip dictionary lookups.

cimport cython

from fastedge._core.express cimport ExpressRequest, monotonic, scan_request, scan_response_start
from fastedge.filters.express cimport ExpressContext, admit
from fastedge.observe.metrics cimport Metrics, RouteStats
from fastedge.upstream.pool cimport ConnectionPool, PooledBase
from fastedge.upstream.express_view cimport ExpressView
from fastedge.upstream.resilient_tier cimport ResilientTier


cdef class ClientConnection
cdef class Exchange


cdef class ExpressRoute:
    cdef public object route, upstream, chain, answer
    cdef public ExpressView view
    cdef public tuple policies
    cdef public str name
    cdef public bint plain
    cdef public RouteStats stats
    cpdef bytes forward_target(self, bytes path, bytes query)


cdef class ExpressSettings:
    cdef public object gateway, match, loop_time, tracer, trace_bound
    cdef public Metrics metrics
    cdef public bint enabled, access_log, keepalive_off
    cdef public bytes via
    cdef public Py_ssize_t max_head, max_uri, max_body
    cdef public int max_headers
    cdef public long max_requests
    cdef public double horizon, keepalive


cdef class ExpressLane:
    cdef public ExpressSettings settings
    cdef public long long served, promoted


cdef class UpstreamConnection(PooledBase):
    cdef public ClientConnection xclient
    cdef public object target
    cdef public Exchange exchange
    cdef public object codec
    cdef public double idle_since
    cdef public bint read_paused


cdef class ClientConnection:
    cdef public object server
    cdef public bytes proto
    cdef public object gateway
    cdef public object transport
    cdef public object codec
    cdef public Exchange exchange
    cdef public object queue
    cdef public bytes client_ip
    cdef public int paused
    cdef public bint write_paused
    cdef public bint closing
    cdef public bint eof
    cdef public long requests
    cdef public long ahead_bytes
    cdef public double last_read
    cdef public bint _pumping
    cdef public bint admitted
    cdef public object _deadline_handle
    cdef public double _deadline_at
    cdef public double head_started
    cdef public ExpressLane lane
    cdef public ExpressSettings xset
    cdef public ExpressRequest xreq
    cdef public ExpressRoute xroute
    cdef public object xtarget
    cdef public UpstreamConnection xup
    cdef public double xstart, xsent, xdue
    cdef public long long xgen
    cdef public bint xfull
    cdef public Py_ssize_t xleft, xbody
    cdef public int xstatus
    cdef public bint xreuse, xclose
    cdef public ExpressContext xadmit
    cdef public object xspan, xtrace
    @cython.locals(lane=ExpressSettings)
    cpdef data_received(self, bytes data)
    cpdef bint must_close(self)
    cpdef double _due(self)
    @cython.locals(lane=ExpressSettings)
    cpdef rearm(self)
    @cython.locals(req=ExpressRequest, lane=ExpressSettings, span_ids=tuple, extra=bytes, plan=ExpressRoute, pool=ConnectionPool, admitted=ExpressContext, tier=ResilientTier, view=ExpressView, conn=UpstreamConnection)
    cpdef bint _express(self, bytes data, double now)
    @cython.locals(req=ExpressRequest, lane=ExpressSettings, plan=ExpressRoute, tier=ResilientTier, view=ExpressView)
    cpdef express_response(self, bytes data)
    @cython.locals(req=ExpressRequest, lane=ExpressSettings, plan=ExpressRoute)
    cpdef _express_more(self, bytes data)
    cpdef _express_heard(self, ExpressSettings lane, ExpressRoute plan)
    @cython.locals(pool=ConnectionPool, view=ExpressView)
    cpdef _express_end(self, ExpressRequest req, ExpressSettings lane, ExpressRoute plan, UpstreamConnection up, object target, int status, bint reusable, Py_ssize_t body_length, bytes out, bint close)
    @cython.locals(req=ExpressRequest, plan=ExpressRoute)
    cpdef Exchange express_promote(self)
    cpdef _express_idle(self, ExpressSettings lane)
    @cython.locals(req=ExpressRequest, lane=ExpressSettings)
    cpdef _express_answer(self, ExpressSettings lane, ExpressRequest req, ExpressRoute plan, tuple reply)


cdef class Exchange:
    cdef public ClientConnection conn
    cdef public object head
    cdef public double start
    cdef public object route
    cdef public object upstream
    cdef public object target
    cdef public UpstreamConnection up
    cdef public object cc
    cdef public bytes request_id
    cdef public bytes up_target
    cdef public list up_headers
    cdef public list pending
    cdef public long pending_bytes
    cdef public bint request_complete
    cdef public bint request_sent
    cdef public bint response_started
    cdef public bint response_done
    cdef public bint keep_alive
    cdef public bint needs_host
    cdef public bint finished
    cdef public bint retried
    cdef public bint reused
    cdef public int status
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public object error
    cdef public object fctx
    cdef public object span
    cdef public double up_start
    cdef public double last_up_activity
    cdef public object load_target
    cdef public object _timer
    cdef public object hooks
    cdef public int attempt
    cdef public long gen
    cdef public object gen_target
    cdef public object tried
    cdef public object up_span
