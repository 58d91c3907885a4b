# Cython declarations for fastedge/http/fast_engine.py, compiled in pure-Python mode by
# setup.py. The .py file is the source of truth and runs unchanged when not compiled;
# these declarations turn the codecs into C structs so llhttp's callbacks and the proxy
# reach their state without dictionary lookups. Keep in step with the classes' __slots__.

cdef class FastServerCodec:
    cdef public long long _begin_credit, _body_cap, _body_seen, _ended, _feed_len
    cdef public long long _head_fed, _head_upper, _max_head, _max_headers, _max_uri, _meta_wire
    cdef public object _max_body, _resp_remaining
    cdef public bint _chunked, _in_head, _in_message, _msg_keep_alive, _resp_close, _stopped
    cdef public int _resp_mode
    cdef public list _events
    cdef public object _headers, _noted
    cdef public bytes _data, _head_data, _url, _tunnel
    cdef public object _error, _parser, _queue, _trailers


cdef class FastClientCodec:
    cdef public int _body_mode
    cdef public bint _chunked_request, _done, _head_request, _interim, _keep_alive
    cdef public bint _stopped, _stray
    cdef public list _events
    cdef public object _headers
    cdef public bytes _head_buffer, _reason, _tunnel
    cdef public object _parser
