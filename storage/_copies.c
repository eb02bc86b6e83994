/* storage._copies: the rows of storage.schema.Copies, built in C.
 *
 * rows(entries, start, plans, row_id, logical) -> (rows, stop)
 * run(entries, plans) -> (data, framed) or None (see run() below)
 * group(lists) -> groups or None (see group() below: the writer's runs)
 * latest(entries, into) (see latest() below: the DNS join's latest copies)
 * frame(rows) -> bytes (see frame() below: storage/chain.py's batch framing)
 *
 * `entries` are Copies.entries: (proto, companion, ts, uid, client_port, dns_id,
 * latency_us). `plans` maps id(proto) to a plan made by storage/schema.py
 * (RowEncoder._c_plan):
 *     (proto, companion, r, segs, xsegs, comp)
 *   r     the 13 row values that do not change between copies (RowEncoder._part)
 *   segs  6 bytes: the msgpack of the prototype's logical values cut around the
 *         five values that change (ts, uid, client_port, dns_id, latency_us)
 *   xsegs 3 bytes: the msgpack of its ``x`` array cut around dns_id and latency_us
 *   comp  None, or the companion's (r, segs of 4 around ts, uid, client_port, x)
 * or (proto, companion, None) where only Python may encode the prototype.
 *
 * From `start` on, each entry whose plan is here becomes its row (and its
 * companion's) and the logical bytes appended to `logical`; the first entry
 * without one stops the loop, and its index is returned for Python to handle
 * (schema.py encodes it, makes the plan, and calls again).
 *
 * The msgpack written here is msgspec's: the shortest form of each integer and
 * string. tests/storage/test_copies.py holds rows and bytes equal to the general
 * encoder's over generated values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int grow(Buf *b, Py_ssize_t need) {
    if (b->n + need <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->n + need)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const char *s, Py_ssize_t n) {
    if (grow(b, n) < 0)
        return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

static int put_bytes(Buf *b, PyObject *bytes) {
    return put(b, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

static int put_be(Buf *b, unsigned char tag, unsigned long long v, int n) {
    char tmp[9];
    tmp[0] = (char)tag;
    for (int i = 0; i < n; i++)
        tmp[1 + i] = (char)((v >> (8 * (n - 1 - i))) & 0xff);
    return put(b, tmp, 1 + n);
}

/* msgpack int, shortest form; -1 with an exception for a non-int or one over 64 bits. */
static int put_int(Buf *b, PyObject *o) {
    if (!PyLong_CheckExact(o)) {
        PyErr_SetString(PyExc_TypeError, "not an int");
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        return put_be(b, 0xcf, u, 8);
    }
    if (overflow < 0) {
        PyErr_SetString(PyExc_OverflowError, "int below -2**63");
        return -1;
    }
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v >= 0) {
        if (v < 128) {
            char c = (char)v;
            return put(b, &c, 1);
        }
        if (v < 256)
            return put_be(b, 0xcc, (unsigned long long)v, 1);
        if (v < 65536)
            return put_be(b, 0xcd, (unsigned long long)v, 2);
        if (v < 4294967296LL)
            return put_be(b, 0xce, (unsigned long long)v, 4);
        return put_be(b, 0xcf, (unsigned long long)v, 8);
    }
    if (v >= -32) {
        char c = (char)(0xe0 | (v + 32));
        return put(b, &c, 1);
    }
    if (v >= -128)
        return put_be(b, 0xd0, (unsigned long long)v & 0xff, 1);
    if (v >= -32768)
        return put_be(b, 0xd1, (unsigned long long)v & 0xffff, 2);
    if (v >= -2147483648LL)
        return put_be(b, 0xd2, (unsigned long long)v & 0xffffffffULL, 4);
    return put_be(b, 0xd3, (unsigned long long)v, 8);
}

static int put_str(Buf *b, PyObject *o) {
    if (!PyUnicode_CheckExact(o)) {
        PyErr_SetString(PyExc_TypeError, "not a str");
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == NULL)
        return -1;
    int r;
    if (n < 32) {
        char c = (char)(0xa0 | n);
        r = put(b, &c, 1);
    } else if (n < 256) {
        r = put_be(b, 0xd9, (unsigned long long)n, 1);
    } else if (n < 65536) {
        r = put_be(b, 0xda, (unsigned long long)n, 2);
    } else {
        r = put_be(b, 0xdb, (unsigned long long)n, 4);
    }
    return r < 0 ? -1 : put(b, s, n);
}

static PyObject *take(Buf *b) {
    PyObject *out = PyBytes_FromStringAndSize(b->p, b->n);
    b->n = 0;
    return out;
}

/* (row_id, r0, ts, uid, r2, r3, port, r4..r11, None, r12, x): the column order of
 * storage/schema.py COLUMNS. Steals `x`. */
static PyObject *row(long long row_id, PyObject *r, PyObject *ts, PyObject *uid, PyObject *port,
                     PyObject *x) {
    PyObject *t = PyTuple_New(18);
    PyObject *id = PyLong_FromLongLong(row_id);
    if (t == NULL || id == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(id);
        Py_DECREF(x);
        return NULL;
    }
    PyObject *items[18] = {id, PyTuple_GET_ITEM(r, 0), ts, uid, PyTuple_GET_ITEM(r, 2),
                           PyTuple_GET_ITEM(r, 3), port, PyTuple_GET_ITEM(r, 4),
                           PyTuple_GET_ITEM(r, 5), PyTuple_GET_ITEM(r, 6), PyTuple_GET_ITEM(r, 7),
                           PyTuple_GET_ITEM(r, 8), PyTuple_GET_ITEM(r, 9), PyTuple_GET_ITEM(r, 10),
                           PyTuple_GET_ITEM(r, 11), Py_None, PyTuple_GET_ITEM(r, 12), x};
    for (int i = 0; i < 18; i++) {
        if (i != 0 && i != 17)
            Py_INCREF(items[i]);
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    return t;
}

/* segs[0] vals[0] segs[1] ... vals[n-1] segs[n]: the values cut out of a prototype's
 * msgpack, put back. vals[str_at] is a str (-1: none), the others ints. -2: a value
 * put_int cannot write (Python's turn); -1: an error. */
static int put_spliced(Buf *b, PyObject *segs, PyObject **vals, int n, int str_at) {
    for (int k = 0; k < n; k++) {
        if (put_bytes(b, PyTuple_GET_ITEM(segs, k)) < 0)
            return -1;
        if ((k == str_at ? put_str(b, vals[k]) : put_int(b, vals[k])) < 0)
            return -2;
    }
    return put_bytes(b, PyTuple_GET_ITEM(segs, n));
}

/* Appends row `t` to `out` and its logical bytes `lg` to `logical`; steals both. */
static int emit(PyObject *out, PyObject *logical, PyObject *t, PyObject *lg) {
    int r = (t == NULL || lg == NULL || PyList_Append(out, t) < 0 || PyList_Append(logical, lg) < 0)
                ? -1 : 0;
    Py_XDECREF(t);
    Py_XDECREF(lg);
    return r;
}

/* *plan = the C plan for `proto` with `companion` from `plans`: 1, or 0 where there is
 * none to use (Python's turn: it makes the plan, or encodes the copies itself), -1 on
 * an error. */
static int plan_of(PyObject *plans, PyObject *proto, PyObject *companion, PyObject **plan) {
    PyObject *key = PyLong_FromVoidPtr(proto);
    if (key == NULL)
        return -1;
    PyObject *p = PyDict_GetItemWithError(plans, key);
    Py_DECREF(key);
    if (p == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) != 6 || PyTuple_GET_ITEM(p, 0) != proto ||
        PyTuple_GET_ITEM(p, 1) != companion || PyTuple_GET_ITEM(p, 2) == Py_None)
        return 0;
    *plan = p;
    return 1;
}

/* Whether an entry's five values are what put_int/put_str write as msgspec does: values
 * of another type (a bool, a subclass) are left to Python, which also raises on what the
 * store cannot keep. */
static int plain_values(PyObject *e) {
    return PyLong_CheckExact(PyTuple_GET_ITEM(e, 2)) && PyUnicode_CheckExact(PyTuple_GET_ITEM(e, 3)) &&
           PyLong_CheckExact(PyTuple_GET_ITEM(e, 4)) && PyLong_CheckExact(PyTuple_GET_ITEM(e, 5)) &&
           PyLong_CheckExact(PyTuple_GET_ITEM(e, 6));
}

static PyObject *rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *entries, *plans, *logical;
    Py_ssize_t start;
    long long row_id;
    if (!PyArg_ParseTuple(args, "O!nO!LO!", &PyList_Type, &entries, &start, &PyDict_Type, &plans,
                          &row_id, &PyList_Type, &logical))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Buf b = {NULL, 0, 0};
    Py_ssize_t n = PyList_GET_SIZE(entries), i = start;
    for (; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 7)
            break;
        PyObject *plan = NULL;
        int got_plan = plan_of(plans, PyTuple_GET_ITEM(e, 0), PyTuple_GET_ITEM(e, 1), &plan);
        if (got_plan < 0)
            goto fail;
        if (got_plan == 0 || !plain_values(e))
            break; /* Python's turn */
        PyObject *ts = PyTuple_GET_ITEM(e, 2), *uid = PyTuple_GET_ITEM(e, 3);
        PyObject *port = PyTuple_GET_ITEM(e, 4), *dns_id = PyTuple_GET_ITEM(e, 5);
        PyObject *lat = PyTuple_GET_ITEM(e, 6);
        PyObject *r = PyTuple_GET_ITEM(plan, 2), *segs = PyTuple_GET_ITEM(plan, 3);
        PyObject *xsegs = PyTuple_GET_ITEM(plan, 4), *comp = PyTuple_GET_ITEM(plan, 5);
        PyObject *vals[5] = {ts, uid, port, dns_id, lat};
        b.n = 0;
        int got = put_spliced(&b, segs, vals, 5, 1);
        if (got == -2) {
            /* A value put_int cannot write (over 64 bits): Python's turn for this entry. */
            PyErr_Clear();
            break;
        }
        if (got < 0)
            goto fail;
        PyObject *lg = take(&b);
        if (lg == NULL)
            goto fail;
        if (put_spliced(&b, xsegs, vals + 3, 2, -1) < 0) { /* dns_id, latency_us: written above */
            Py_DECREF(lg);
            goto fail;
        }
        PyObject *x = take(&b);
        if (emit(out, logical, x ? row(row_id, r, ts, uid, port, x) : NULL, lg) < 0)
            goto fail;
        row_id++;
        if (comp != Py_None) {
            /* ts, uid, client_port: written once above, they cannot fail here. */
            if (put_spliced(&b, PyTuple_GET_ITEM(comp, 1), vals, 3, 1) < 0)
                goto fail;
            PyObject *clg = take(&b);
            PyObject *cx = PyTuple_GET_ITEM(comp, 2);
            Py_INCREF(cx); /* row() takes it */
            if (emit(out, logical, row(row_id, PyTuple_GET_ITEM(comp, 0), ts, uid, port, cx), clg) < 0)
                goto fail;
            row_id++;
        }
    }
    PyMem_Free(b.p);
    return Py_BuildValue("(Nn)", out, i);
fail:
    PyMem_Free(b.p);
    Py_DECREF(out);
    return NULL;
}

static int put_array_head(Buf *b, Py_ssize_t n) {
    if (n < 16) {
        char c = (char)(0x90 | n);
        return put(b, &c, 1);
    }
    if (n < 65536)
        return put_be(b, 0xdc, (unsigned long long)n, 2);
    return put_be(b, 0xdd, (unsigned long long)n, 4);
}

/* run(entries, plans) -> (data, framed) or None
 *
 * The copies of one prototype (and companion) as a run (storage/runs.py): its
 * `data`, the msgpack array of each entry's [ts, uid, client_port, dns_id,
 * latency_us] as msgspec writes entries' tails; and `framed`, each copy's
 * logical bytes (and its companion's) after its length as 4 bytes big-endian,
 * as storage/chain.py hashes them (frame() below). None where Python must do it
 * (no plan, an entry of another prototype, a value put_int/put_str cannot
 * write). */
static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *entries, *plans;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &entries, &PyDict_Type, &plans))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(entries);
    if (n == 0)
        Py_RETURN_NONE;
    PyObject *e0 = PyList_GET_ITEM(entries, 0);
    if (!PyTuple_CheckExact(e0) || PyTuple_GET_SIZE(e0) != 7)
        Py_RETURN_NONE;
    PyObject *proto = PyTuple_GET_ITEM(e0, 0), *companion = PyTuple_GET_ITEM(e0, 1), *plan = NULL;
    int got_plan = plan_of(plans, proto, companion, &plan);
    if (got_plan <= 0)
        return got_plan < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *segs = PyTuple_GET_ITEM(plan, 3), *comp = PyTuple_GET_ITEM(plan, 5);
    Buf f = {NULL, 0, 0}, d = {NULL, 0, 0};
    if (put_array_head(&d, n) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 7 || PyTuple_GET_ITEM(e, 0) != proto ||
            PyTuple_GET_ITEM(e, 1) != companion || !plain_values(e))
            goto python;
        PyObject *vals[5] = {PyTuple_GET_ITEM(e, 2), PyTuple_GET_ITEM(e, 3), PyTuple_GET_ITEM(e, 4),
                             PyTuple_GET_ITEM(e, 5), PyTuple_GET_ITEM(e, 6)};
        /* Each logical row after a 4-byte length, filled in once the row is written. */
        for (int part = 0; part < (comp != Py_None ? 2 : 1); part++) {
            Py_ssize_t at = f.n;
            if (put(&f, "\0\0\0\0", 4) < 0)
                goto fail;
            int got = part == 0 ? put_spliced(&f, segs, vals, 5, 1)
                                : put_spliced(&f, PyTuple_GET_ITEM(comp, 1), vals, 3, 1);
            if (got == -2)
                goto python;
            if (got < 0)
                goto fail;
            unsigned long long len = (unsigned long long)(f.n - at - 4);
            unsigned char *p = (unsigned char *)f.p + at;
            p[0] = (unsigned char)(len >> 24);
            p[1] = (unsigned char)(len >> 16);
            p[2] = (unsigned char)(len >> 8);
            p[3] = (unsigned char)len;
        }
        /* The entry's tail as msgspec writes a 5-tuple; the values were written above. */
        char head = (char)0x95;
        if (put(&d, &head, 1) < 0)
            goto fail;
        for (int k = 0; k < 5; k++)
            if ((k == 1 ? put_str(&d, vals[k]) : put_int(&d, vals[k])) < 0)
                goto fail;
    }
    PyObject *out = Py_BuildValue("(y#y#)", d.p, d.n, f.p, f.n);
    PyMem_Free(f.p);
    PyMem_Free(d.p);
    return out;
python:
    PyErr_Clear();
    PyMem_Free(f.p);
    PyMem_Free(d.p);
    Py_RETURN_NONE;
fail:
    PyMem_Free(f.p);
    PyMem_Free(d.p);
    return NULL;
}

/* group(lists) -> groups or None: the entries of the lists of Copies entries
 * `lists`, grouped by prototype in order of first appearance, each group in its
 * entries' order (the writer's runs, storage/runs.py). None where Python must
 * group: an entry that is not a 7-tuple, or copies of one prototype with
 * different companions. */
static PyObject *group(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyList_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "group() takes a list of lists");
        return NULL;
    }
    PyObject *by = PyDict_New(), *out = PyList_New(0);
    if (by == NULL || out == NULL)
        goto fail;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(arg); j++) {
        PyObject *entries = PyList_GET_ITEM(arg, j);
        if (!PyList_CheckExact(entries))
            goto python;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
            PyObject *e = PyList_GET_ITEM(entries, i);
            if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 7)
                goto python;
            PyObject *key = PyLong_FromVoidPtr(PyTuple_GET_ITEM(e, 0));
            if (key == NULL)
                goto fail;
            PyObject *g = PyDict_GetItemWithError(by, key);
            if (g == NULL) {
                if (PyErr_Occurred() || (g = PyList_New(0)) == NULL) {
                    Py_DECREF(key);
                    goto fail;
                }
                int bad = PyDict_SetItem(by, key, g) < 0 || PyList_Append(out, g) < 0;
                Py_DECREF(g); /* held by `by` and `out` */
                if (bad) {
                    Py_DECREF(key);
                    goto fail;
                }
            } else if (PyTuple_GET_ITEM(PyList_GET_ITEM(g, 0), 1) != PyTuple_GET_ITEM(e, 1)) {
                Py_DECREF(key);
                goto python;
            }
            Py_DECREF(key);
            if (PyList_Append(g, e) < 0)
                goto fail;
        }
    }
    Py_DECREF(by);
    return out;
python:
    Py_DECREF(by);
    Py_DECREF(out);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(by);
    Py_XDECREF(out);
    return NULL;
}

/* latest(entries, into) -> None: each entry of the list `entries` (Copies entries)
 * moved to the end of the dict `into` under id(its prototype), in order: `into`
 * then holds each prototype's latest copy, in the order of those latest copies
 * (what linewarden/dnsjoin.py learns from; ~0.1 µs an entry against ~0.3 in Python). */
static PyObject *latest(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *entries, *into;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &entries, &PyDict_Type, &into))
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(entries); i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) < 1) {
            PyErr_SetString(PyExc_TypeError, "latest() takes Copies entries");
            return NULL;
        }
        PyObject *key = PyLong_FromVoidPtr(PyTuple_GET_ITEM(e, 0));
        if (key == NULL)
            return NULL;
        int r = PyDict_Contains(into, key);
        if (r > 0)
            r = PyDict_DelItem(into, key) < 0 ? -1 : 0;
        if (r < 0 || PyDict_SetItem(into, key, e) < 0) {
            Py_DECREF(key);
            return NULL;
        }
        Py_DECREF(key);
    }
    Py_RETURN_NONE;
}

/* frame(rows) -> bytes: each of the list `rows` (bytes) after its length as 4 bytes
 * big-endian, concatenated: what storage/chain.py hashes for a batch (~20 ns a row
 * here against ~250 in Python, for every record the store takes). */
static PyObject *frame(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyList_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "frame() takes a list of bytes");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyList_GET_ITEM(arg, i);
        if (!PyBytes_CheckExact(r)) {
            PyErr_SetString(PyExc_TypeError, "frame() takes a list of bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(r) > 0xffffffffLL) {
            PyErr_SetString(PyExc_OverflowError, "a row over 4 GiB");
            return NULL;
        }
        total += 4 + PyBytes_GET_SIZE(r);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyList_GET_ITEM(arg, i);
        unsigned long long len = (unsigned long long)PyBytes_GET_SIZE(r);
        p[0] = (unsigned char)(len >> 24);
        p[1] = (unsigned char)(len >> 16);
        p[2] = (unsigned char)(len >> 8);
        p[3] = (unsigned char)len;
        memcpy(p + 4, PyBytes_AS_STRING(r), (size_t)len);
        p += 4 + len;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"latest", latest, METH_VARARGS, "latest(entries, into): each entry moved to the end of into"},
    {"group", group, METH_O, "group(lists) -> entries grouped by prototype, or None"},
    {"frame", frame, METH_O, "frame(rows) -> each row after its length (4 bytes, big-endian)"},
    {"rows", rows, METH_VARARGS, "rows(entries, start, plans, row_id, logical) -> (rows, stop)"},
    {"run", run, METH_VARARGS, "run(entries, plans) -> (data, framed) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "storage._copies", "The rows of storage.schema.Copies, built in C.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copies(void) { return PyModule_Create(&module); }
