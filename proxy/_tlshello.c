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

#include "tlshello_core.h"

/* tlshello.VERSION_NAMES, made once: 0x0300 + i → version_names[i]. */
static const char *const version_text[] = {"SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"};
static PyObject *version_names[5];

/* tlshello._alpn: the names of a list hello_alpn checked (undecodable bytes replaced). */
static PyObject *alpn_list(hello_span protos) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    size_t i = 0;
    while (i < protos.n) {
        size_t end = i + 1 + protos.p[i];
        PyObject *name = PyUnicode_DecodeASCII((const char *)protos.p + i + 1, end - i - 1, "replace");
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
        i = end;
    }
    return out;
}

/* tlshello.version_name. */
static PyObject *version_name(unsigned code) {
    if (code >= 0x0300 && code <= 0x0304)
        return Py_NewRef(version_names[code - 0x0300]);
    char text[8];
    snprintf(text, sizeof text, "0x%04x", code);
    return PyUnicode_FromString(text);
}

/* tlshello._versions: the list without GREASE values, or the legacy version alone
 * when that leaves nothing ("if not versions"). */
static PyObject *version_list(const hello_spans *h) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; h->has_versions && i + 1 < h->versions.n; i += 2) {
        unsigned code = hello_u16(h->versions.p + i);
        if ((code & 0x0F0F) == 0x0A0A && (code >> 8) == (code & 0xFF))
            continue; /* GREASE (RFC 8701) */
        PyObject *name = version_name(code);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
    }
    if (PyList_GET_SIZE(out) == 0) {
        PyObject *name = version_name(h->legacy_version);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(name);
    }
    return out;
}

/* tlshello._parse_body(body, complete=True)'s result from the spans hello_scan found. */
static PyObject *parse_result(const hello_spans *h) {
    PyObject *sni = h->has_sni ? PyUnicode_DecodeASCII((const char *)h->sni.p, h->sni.n, "strict")
                               : Py_NewRef(Py_None);
    PyObject *alpn = h->has_alpn ? alpn_list(h->alpn) : PyList_New(0);
    PyObject *versions = version_list(h);
    if (sni == NULL || alpn == NULL || versions == NULL) {
        Py_XDECREF(sni);
        Py_XDECREF(alpn);
        Py_XDECREF(versions);
        return NULL;
    }
    return Py_BuildValue("(NNN)", sni, alpn, versions);
}

static PyObject *scan(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    hello_spans h;
    int got = hello_scan(view.buf, (size_t)view.len, &h);
    PyBuffer_Release(&view);
    if (got != HELLO_OK)
        return Py_NewRef(Py_None);
    return parse_result(&h);
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
