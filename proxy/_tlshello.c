/* The compiled ClientHello scan of proxy/tlshello.py: its common case, in C.
 *
 * scan(data) reads a buffer (bytes, bytearray, memoryview) holding the start of
 * a client's byte stream. When the whole ClientHello is in the first TLS record
 * (every browser, curl, OpenSSL: the case tlshello._handshake_body takes "in one
 * slice") and it parses cleanly, it returns (sni, alpn, versions) exactly as
 * tlshello._parse_body(..., complete=True) would: sni the first host_name of the
 * last server_name extension (str, ASCII) or None; alpn the protocol names of
 * the last ALPN extension (ASCII, undecodable bytes replaced); versions the last
 * supported_versions list without GREASE values, or the legacy_version alone.
 * Anything else returns None, and the Python parser answers it (a hello split
 * over records or still incomplete: NeedMoreData; a malformed one: InputError
 * with its reason and offset). So the C side never raises for bad input and has
 * no error messages of its own: one parser's semantics, the Python one, and this
 * a shortcut that tests/proxy/test_tlshello_c.py checks against it.
 *
 * Why: the Python parse is ~11 µs warm (a hello has 15-20 extensions, each a few
 * bytecode lines) and ~44 µs in place on a busy gateway, on every new TLS
 * connection; here it is well under a microsecond plus the result objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>

#define HANDSHAKE 22
#define CLIENT_HELLO 1
#define EXT_SERVER_NAME 0
#define EXT_ALPN 16
#define EXT_SUPPORTED_VERSIONS 43
#define MAX_CLIENT_HELLO_BYTES (64 * 1024) /* tlshello.MAX_CLIENT_HELLO_BYTES */
#define MAX_RECORD (16384 + 2048)          /* tlshello._MAX_RECORD */

/* tlshello.VERSION_NAMES, made once: 0x0300 + i → version_names[i]. */
static const char *const version_text[] = {"SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"};
static PyObject *version_names[5];

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
} span;

static unsigned u16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* tlshello._vector: the body of a vector with an `lenbytes` length prefix; 0 when short. */
static int vector(span ext, int lenbytes, span *out) {
    if (ext.n < lenbytes)
        return 0;
    Py_ssize_t len = lenbytes == 1 ? ext.p[0] : (Py_ssize_t)u16(ext.p);
    if (lenbytes + len > ext.n)
        return 0;
    out->p = ext.p + lenbytes;
    out->n = len;
    return 1;
}

/* tlshello._server_name: 1 and *sni set (a new reference, or None); 0: defer to Python. */
static int server_name(span ext, PyObject **sni) {
    span names;
    if (!vector(ext, 2, &names))
        return 0;
    Py_ssize_t i = 0;
    while (i < names.n) {
        if (i + 3 > names.n)
            return 0;
        unsigned kind = names.p[i];
        Py_ssize_t size = u16(names.p + i + 1);
        i += 3;
        if (i + size > names.n)
            return 0;
        if (kind == 0) {
            PyObject *name = PyUnicode_DecodeASCII((const char *)names.p + i, size, "strict");
            if (name == NULL) { /* not ASCII: Python raises its InputError */
                PyErr_Clear();
                return 0;
            }
            *sni = name;
            return 1;
        }
        i += size;
    }
    *sni = Py_NewRef(Py_None);
    return 1;
}

/* tlshello._alpn: 1 and *alpn set to a new list; 0: defer to Python (or an error is set). */
static int alpn_list(span ext, PyObject **alpn) {
    span protos;
    if (!vector(ext, 2, &protos))
        return 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return 0;
    Py_ssize_t i = 0;
    while (i < protos.n) {
        Py_ssize_t end = i + 1 + protos.p[i];
        if (end > protos.n) {
            Py_DECREF(out);
            return 0;
        }
        PyObject *name = PyUnicode_DecodeASCII((const char *)protos.p + i + 1, end - i - 1, "replace");
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return 0;
        }
        Py_DECREF(name);
        i = end;
    }
    *alpn = out;
    return 1;
}

/* tlshello.version_name. */
static PyObject *version_name(unsigned code) {
    if (code >= 0x0300 && code <= 0x0304)
        return Py_NewRef(version_names[code - 0x0300]);
    char text[8];
    snprintf(text, sizeof text, "0x%04x", code);
    return PyUnicode_FromString(text);
}

/* tlshello._versions: 1 and *versions set to a new list; 0: defer to Python (or an error is set). */
static int version_list(span ext, PyObject **versions) {
    span raw;
    if (!vector(ext, 1, &raw))
        return 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return 0;
    for (Py_ssize_t i = 0; i + 1 < raw.n; i += 2) {
        unsigned code = u16(raw.p + i);
        if ((code & 0x0F0F) == 0x0A0A && (code >> 8) == (code & 0xFF))
            continue; /* GREASE (RFC 8701) */
        PyObject *name = version_name(code);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return 0;
        }
        Py_DECREF(name);
    }
    *versions = out;
    return 1;
}

/* Replace *slot (a new reference or NULL) by value (a new reference). */
static void put(PyObject **slot, PyObject *value) {
    Py_XDECREF(*slot);
    *slot = value;
}

/* tlshello._parse_body(body, complete=True), RFC 8446 4.1.2 field by field. */
static PyObject *parse_body(span b) {
    const unsigned char *p = b.p;
    Py_ssize_t n = b.n, i;
    if (n < 34)
        return Py_NewRef(Py_None);
    unsigned legacy = u16(p);
    i = 34; /* legacy_version, random */
    if (i >= n)
        return Py_NewRef(Py_None);
    Py_ssize_t size = p[i++]; /* session id */
    if (i + size > n || size > 32)
        return Py_NewRef(Py_None);
    i += size;
    if (i + 2 > n)
        return Py_NewRef(Py_None);
    size = u16(p + i); /* cipher suites */
    i += 2;
    if (i + size > n || size % 2)
        return Py_NewRef(Py_None);
    i += size;
    if (i >= n)
        return Py_NewRef(Py_None);
    i += 1 + p[i]; /* compression methods */
    if (i > n)
        return Py_NewRef(Py_None);
    PyObject *sni = NULL, *alpn = NULL, *versions = NULL, *got = NULL;
    int ok = 1;
    if (i < n) {
        if (i + 2 > n)
            return Py_NewRef(Py_None);
        Py_ssize_t ext_len = u16(p + i);
        i += 2;
        if (n - i < ext_len)
            return Py_NewRef(Py_None);
        Py_ssize_t end = i + ext_len;
        while (ok && i < end) {
            if (i + 4 > end) {
                ok = 0;
                break;
            }
            unsigned etype = u16(p + i);
            size = u16(p + i + 2);
            i += 4;
            if (i + size > end) {
                ok = 0;
                break;
            }
            span ext = {p + i, size};
            i += size;
            /* A hello has ~15-20 extensions; three matter here, and a repeated one
             * replaces what the earlier gave (as the Python parser's assignments do). */
            if (etype == EXT_SERVER_NAME)
                ok = server_name(ext, &got);
            else if (etype == EXT_ALPN)
                ok = alpn_list(ext, &got);
            else if (etype == EXT_SUPPORTED_VERSIONS)
                ok = version_list(ext, &got);
            else
                continue;
            if (ok)
                put(etype == EXT_SERVER_NAME ? &sni : etype == EXT_ALPN ? &alpn : &versions, got);
        }
    }
    if (ok && versions != NULL && PyList_GET_SIZE(versions) == 0)
        put(&versions, NULL); /* "if not versions": the legacy version stands in */
    if (ok && versions == NULL) {
        PyObject *name = version_name(legacy);
        versions = name ? PyList_New(1) : NULL;
        if (versions != NULL)
            PyList_SET_ITEM(versions, 0, name);
        else {
            Py_XDECREF(name);
            ok = 0;
        }
    }
    if (ok && alpn == NULL && (alpn = PyList_New(0)) == NULL)
        ok = 0;
    if (!ok) {
        Py_XDECREF(sni);
        Py_XDECREF(alpn);
        Py_XDECREF(versions);
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    return Py_BuildValue("(NNN)", sni ? sni : Py_NewRef(Py_None), alpn, versions);
}

static PyObject *scan(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    Py_ssize_t len = view.len;
    PyObject *result = NULL;
    /* tlshello._handshake_body's one slice: the whole ClientHello in the first record. */
    if (len >= 9 && d[0] == HANDSHAKE && d[1] == 3 && d[5] == CLIENT_HELLO) {
        Py_ssize_t rlen = u16(d + 3);
        Py_ssize_t mlen = ((Py_ssize_t)d[6] << 16) | ((Py_ssize_t)d[7] << 8) | d[8];
        if (4 + mlen <= rlen && rlen <= MAX_RECORD && mlen <= MAX_CLIENT_HELLO_BYTES && len >= 5 + rlen) {
            span body = {d + 9, mlen};
            result = parse_body(body);
        }
    }
    PyBuffer_Release(&view);
    if (result == NULL && !PyErr_Occurred())
        result = Py_NewRef(Py_None);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O,
     "scan(data) -> (sni, alpn, versions), or None when the Python parser must answer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._tlshello", "The compiled ClientHello scan (proxy/tlshello.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__tlshello(void) {
    for (int i = 0; i < 5; i++) {
        if (version_names[i] == NULL && (version_names[i] = PyUnicode_InternFromString(version_text[i])) == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
