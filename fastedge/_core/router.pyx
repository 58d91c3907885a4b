# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""PrefixRouter, compiled. ``router_py.py`` is the specification (matching rules in its
docstring); this file follows it exactly.

The hot path is ``match``: per host tier it scans the path backwards in C for ``/``
boundaries no longer than the tier's longest prefix and probes a dict with each
candidate prefix, longest first. Results are prebuilt ``(value, prefix)`` tuples, so a
match allocates only the candidate substrings.
"""

cimport cython
from cpython.object cimport PyObject

from collections.abc import Iterable

cdef extern from "Python.h":
    # Borrowed reference or NULL; keys here are always str, whose hash cannot fail.
    PyObject* PyDict_GetItemWithError(object mp, object key) except? NULL
    str PyUnicode_Substring(str s, Py_ssize_t start, Py_ssize_t end)

__all__ = ["PrefixRouter"]

cdef Py_ssize_t _HOST_CACHE_SIZE = 256  # distinct Host values remembered by match()


cdef str _normalize_prefix(object prefix):
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix.startswith("/"):
        raise ValueError(f"prefix must start with '/', got {prefix!r}")
    if "?" in prefix or "#" in prefix:
        raise ValueError(f"prefix must be a path without query or fragment, got {prefix!r}")
    return prefix.rstrip("/") or "/"


cdef str _normalize_host(str host):
    """Lower-case, without ``:port`` and without a trailing dot."""
    cdef Py_ssize_t end, colon
    host = host.lower()
    if host.startswith("["):  # IPv6 literal: the port, if any, follows the "]"
        end = host.find("]")
        if end != -1:
            host = host[: end + 1]
    else:
        colon = host.rfind(":")
        if colon != -1:
            host = host[:colon]
    if host.endswith("."):
        host = host[: len(host) - 1]
    return host


cdef tuple _route_host(object host):
    if not isinstance(host, str):
        raise TypeError(f"host must be a str or None, not {type(host).__name__}")
    cdef str name = _normalize_host(host)
    cdef bint wildcard = name.startswith("*.")
    if wildcard:
        name = name[1:]
    if "*" in name or name in ("", ".") or (name.startswith(".") and not wildcard):
        raise ValueError(
            f"host must be a name or '*.suffix' (use host=None for any host), got {host!r}"
        )
    return wildcard, name


cdef object _check_methods(object methods):
    if methods is None:
        return None
    if isinstance(methods, str) or not isinstance(methods, Iterable):
        raise TypeError('methods must be an iterable of str such as {"GET"}, or None')
    cdef frozenset names = frozenset(methods)
    if not names:
        raise ValueError("methods must not be empty (use None for every method)")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"each method must be a non-empty str, got {name!r}")
    return names


@cython.final
cdef class _RouteSet:
    cdef object any  # (value, prefix) or None
    cdef dict by_method  # method -> (value, prefix)

    def __cinit__(self):
        self.any = None
        self.by_method = {}

    cdef inline object lookup(self, object method):
        cdef PyObject* found
        if method is not None and self.by_method:
            found = PyDict_GetItemWithError(self.by_method, method)
            if found is not NULL:
                return <object>found
        return self.any


@cython.final
cdef class _Table:
    cdef dict routes  # normalised prefix -> _RouteSet
    cdef Py_ssize_t max_len  # longest prefix other than "/"

    def __cinit__(self):
        self.routes = {}
        self.max_len = 0

    cdef inline object _lookup(self, str prefix, object method):
        cdef PyObject* entry = PyDict_GetItemWithError(self.routes, prefix)
        if entry is NULL:
            return None
        return (<_RouteSet>entry).lookup(method)

    cdef object probe(self, str path, object method):
        cdef Py_ssize_t n = len(path)
        cdef Py_ssize_t j
        cdef object found
        if n <= self.max_len:
            found = self._lookup(path, method)
            if found is not None:
                return found
        # Candidates path[:j] with path[j] == "/", longest first; "/" is probed last.
        j = n - 1 if n - 1 < self.max_len else self.max_len
        while j > 1:
            if path[j] == u"/":
                found = self._lookup(PyUnicode_Substring(path, 0, j), method)
                if found is not None:
                    return found
            j -= 1
        return self._lookup(u"/", method)

    cdef void recompute_max_len(self):
        cdef Py_ssize_t longest = 0
        for prefix in self.routes:
            if prefix != u"/" and len(prefix) > longest:
                longest = len(prefix)
        self.max_len = longest


@cython.final
cdef class PrefixRouter:
    """Longest-prefix router with host and method filters; see ``router.pyi``."""

    cdef dict _exact  # host -> _Table
    cdef dict _wild  # ".suffix" -> _Table
    cdef _Table _any
    cdef Py_ssize_t _count
    # Raw Host value -> normalised name. A proxy sees few distinct Host values, so this
    # skips lower()/port stripping per request; cleared when full so hostile clients
    # sending random hosts cannot grow it.
    cdef dict _host_cache

    def __cinit__(self):
        self._host_cache = {}
        self._exact = {}
        self._wild = {}
        self._any = _Table()
        self._count = 0

    cdef _Table _table(self, object host, bint create):
        if host is None:
            return self._any
        wildcard, key = _route_host(host)
        cdef dict tier = self._wild if wildcard else self._exact
        table = tier.get(key)
        if table is None and create:
            table = tier[key] = _Table()
        return table

    def add(self, prefix, value, *, host=None, methods=None):
        """Route ``prefix`` (optionally only for ``host`` and ``methods``) to ``value``."""
        cdef str key = _normalize_prefix(prefix)
        cdef object names = _check_methods(methods)
        cdef _Table table = self._table(host, True)
        cdef _RouteSet entry = table.routes.get(key)
        if entry is None:
            entry = _RouteSet()
            table.routes[key] = entry
            self._count += 1
            if key != u"/" and len(key) > table.max_len:
                table.max_len = len(key)
        cdef tuple result = (value, key)
        if names is None:
            entry.any = result
        else:
            for name in names:
                entry.by_method[name] = result

    def remove(self, prefix, *, host=None):
        """Remove every route of (prefix, host); ``KeyError`` if there is none."""
        cdef str key = _normalize_prefix(prefix)
        cdef _Table table = self._table(host, False)
        if table is None or key not in table.routes:
            raise KeyError((prefix, host))
        del table.routes[key]
        self._count -= 1
        table.recompute_max_len()
        if not table.routes and host is not None:
            wildcard, name = _route_host(host)
            del (self._wild if wildcard else self._exact)[name]

    def match(self, path, host=None, method=None):
        """``(value, matched_prefix)`` of the most specific route, or ``None``."""
        if type(path) is not str:
            if not isinstance(path, str):
                raise TypeError(f"path must be a str, not {type(path).__name__}")
            path = str(path)  # a str subclass: match on its plain text
        if host is not None and not isinstance(host, str):
            raise TypeError(f"host must be a str or None, not {type(host).__name__}")
        if method is not None and not isinstance(method, str):
            raise TypeError(f"method must be a str or None, not {type(method).__name__}")
        cdef str spath = <str>path
        if len(spath) == 0 or spath[0] != u"/":
            return None
        cdef object found
        cdef str name
        cdef Py_ssize_t dot
        cdef PyObject* table
        cdef PyObject* cached
        if host is not None and (self._exact or self._wild):
            cached = PyDict_GetItemWithError(self._host_cache, host)
            if cached is not NULL:
                name = <str>cached
            else:
                name = _normalize_host(<str>host)
                if len(self._host_cache) >= _HOST_CACHE_SIZE:
                    self._host_cache.clear()
                self._host_cache[host] = name
            table = PyDict_GetItemWithError(self._exact, name)
            if table is not NULL:
                found = (<_Table>table).probe(spath, method)
                if found is not None:
                    return found
            if self._wild:
                dot = name.find(u".", 1)
                while dot != -1:
                    table = PyDict_GetItemWithError(
                        self._wild, PyUnicode_Substring(name, dot, len(name))
                    )
                    if table is not NULL:
                        found = (<_Table>table).probe(spath, method)
                        if found is not None:
                            return found
                    dot = name.find(u".", dot + 1)
        return self._any.probe(spath, method)

    def __len__(self):
        return self._count

    def __repr__(self):
        return f"<PrefixRouter routes={self._count}>"
