/* storage._copies: the rows of storage.schema.Copies, built in C.
 *
 * rows(entries, start, plans, row_id, logical) -> (rows, stop)
 * run(entries, plans) -> (data, framed) or None (see run() below)
 * group(lists) -> groups or None (see group() below: the writer's runs)
 * latest(entries, into) (see latest() below: the DNS join's latest copies)
 * frame(rows) -> bytes (see frame() below: storage/chain.py's batch framing)
 * scan, expand, latest_hits, group_hits, run_hits: the same for the DNS hit path's
 *   packed copies (storage/hits.py), read where they are (see below)
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
#include <stdint.h>
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

/* msgpack int, shortest form, as msgspec writes it. */
static int put_ll(Buf *b, long long v) {
    if (grow(b, 9) < 0)
        return -1;
    unsigned char *p = (unsigned char *)b->p + b->n, tag;
    int n;
    if (v >= 0 && v < 128) {
        p[0] = (unsigned char)v;
        b->n += 1;
        return 0;
    }
    if (v < 0 && v >= -32) {
        p[0] = (unsigned char)(0xe0 | (v + 32));
        b->n += 1;
        return 0;
    }
    if (v >= 0) {
        n = v < 256 ? 1 : v < 65536 ? 2 : v < 4294967296LL ? 4 : 8;
        tag = n == 1 ? 0xcc : n == 2 ? 0xcd : n == 4 ? 0xce : 0xcf;
    } else {
        n = v >= -128 ? 1 : v >= -32768 ? 2 : v >= -2147483648LL ? 4 : 8;
        tag = n == 1 ? 0xd0 : n == 2 ? 0xd1 : n == 4 ? 0xd2 : 0xd3;
    }
    unsigned long long u = (unsigned long long)v;
    p[0] = tag;
    for (int i = 0; i < n; i++)
        p[1 + i] = (unsigned char)(u >> (8 * (n - 1 - i)));
    b->n += 1 + n;
    return 0;
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
    return put_ll(b, v);
}

/* msgpack str of `n` bytes of UTF-8. */
static int put_utf8(Buf *b, const char *s, Py_ssize_t n) {
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

static int put_str(Buf *b, PyObject *o) {
    if (!PyUnicode_CheckExact(o)) {
        PyErr_SetString(PyExc_TypeError, "not a str");
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == NULL)
        return -1;
    return put_utf8(b, s, n);
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

/* The 4-byte big-endian length before the row written after `mark` (chain.frame). */
static void patch_length(Buf *f, Py_ssize_t mark) {
    unsigned long long len = (unsigned long long)(f->n - mark - 4);
    unsigned char *p = (unsigned char *)f->p + mark;
    p[0] = (unsigned char)(len >> 24);
    p[1] = (unsigned char)(len >> 16);
    p[2] = (unsigned char)(len >> 8);
    p[3] = (unsigned char)len;
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
            patch_length(&f, at);
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

/* --- The DNS hit path's packed copies (storage/hits.py) -------------------------------
 *
 * A hit record is HIT_SIZE bytes, little-endian: ts i64, uid sequence number u64,
 * template u32, client_port u16, dns_id u16, latency_us u32. `templates` and `tmap`
 * map a template number to (uid prefix, proto, companion); an entry's uid is the
 * prefix + the sequence number in lower-case hex. The main process keeps the
 * workers' hit records as they came (a channel frame's bytes and the templates it
 * names) and these functions read them there, so that a hit costs no Python object
 * of its own between the channel and the store. */
#define HIT_SIZE 28

static unsigned long long le(const unsigned char *p, int n) {
    unsigned long long v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* The template numbered `tid` in `templates` (borrowed), checked for its shape. */
static PyObject *template_at(PyObject *templates, unsigned long tid) {
    PyObject *key = PyLong_FromUnsignedLong(tid);
    if (key == NULL)
        return NULL;
    PyObject *t = PyDict_GetItemWithError(templates, key);
    if (t == NULL && !PyErr_Occurred())
        PyErr_SetObject(PyExc_KeyError, key);
    Py_DECREF(key);
    if (t != NULL && (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3 ||
                      !PyUnicode_CheckExact(PyTuple_GET_ITEM(t, 0)))) {
        PyErr_SetString(PyExc_TypeError, "a template is (prefix, proto, companion)");
        return NULL;
    }
    return t;
}

static int hit_records(PyObject *records, const unsigned char **p, Py_ssize_t *n) {
    if (!PyBytes_CheckExact(records) || PyBytes_GET_SIZE(records) % HIT_SIZE != 0) {
        PyErr_SetString(PyExc_ValueError, "hit records are bytes, a multiple of 28 long");
        return -1;
    }
    *p = (const unsigned char *)PyBytes_AS_STRING(records);
    *n = PyBytes_GET_SIZE(records) / HIT_SIZE;
    return 0;
}

/* prefix + hex(seq) into `uid` (at least plen + 17 bytes); its length. */
static Py_ssize_t uid_of(char *uid, const char *prefix, Py_ssize_t plen, unsigned long long seq) {
    static const char hex[] = "0123456789abcdef";
    memcpy(uid, prefix, (size_t)plen);
    int digits = 1;
    while (digits < 16 && (seq >> (4 * digits)) != 0)
        digits++;
    for (int i = digits - 1; i >= 0; i--, seq >>= 4)
        uid[plen + i] = hex[seq & 15];
    return plen + digits;
}

#define UID_MAX 128

/* The entry (proto, companion, ts, uid, client_port, dns_id, latency_us) of the
 * hit record at `p` under template `t`. */
static PyObject *entry_of(PyObject *t, const unsigned char *p) {
    Py_ssize_t plen;
    const char *prefix = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(t, 0), &plen);
    if (prefix == NULL)
        return NULL;
    char small[UID_MAX], *uid = plen <= UID_MAX - 17 ? small : PyMem_Malloc((size_t)plen + 17);
    if (uid == NULL)
        return PyErr_NoMemory();
    Py_ssize_t ulen = uid_of(uid, prefix, plen, le(p + 8, 8));
    PyObject *e = PyTuple_New(7), *u = PyUnicode_FromStringAndSize(uid, ulen);
    if (uid != small)
        PyMem_Free(uid);
    if (e == NULL || u == NULL) {
        Py_XDECREF(e);
        Py_XDECREF(u);
        return NULL;
    }
    PyObject *vals[7] = {PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2),
                         PyLong_FromLongLong((long long)le(p, 8)), u,
                         PyLong_FromLong((long)le(p + 20, 2)), PyLong_FromLong((long)le(p + 22, 2)),
                         PyLong_FromUnsignedLong((unsigned long)le(p + 24, 4))};
    Py_INCREF(vals[0]);
    Py_INCREF(vals[1]);
    int ok = 1;
    for (int k = 0; k < 7; k++) {
        ok &= vals[k] != NULL;
        PyTuple_SET_ITEM(e, k, vals[k]);
    }
    if (!ok) {
        Py_DECREF(e);
        return NULL;
    }
    return e;
}

/* A set of template numbers (open addressing; numbers are stored plus one, 0 is empty). */
typedef struct {
    unsigned long long *slot;
    intptr_t *val; /* a group number, or a borrowed template */
    size_t mask;
} TidSet;

static int tidset_init(TidSet *s, Py_ssize_t n) {
    size_t cap = 16;
    while (cap < (size_t)n * 2 + 2)
        cap *= 2;
    s->slot = PyMem_Calloc(cap, sizeof *s->slot);
    s->val = PyMem_Malloc(cap * sizeof *s->val);
    s->mask = cap - 1;
    if (s->slot == NULL || s->val == NULL) {
        PyMem_Free(s->slot);
        PyMem_Free(s->val);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* The slot of `tid`: *fresh is 1 where it was not there (and is now). */
static size_t tidset_put(TidSet *s, unsigned long tid, int *fresh) {
    unsigned long long key = (unsigned long long)tid + 1;
    size_t i = (size_t)(key * 0x9E3779B97F4A7C15ULL >> 20) & s->mask;
    while (s->slot[i] != 0 && s->slot[i] != key)
        i = (i + 1) & s->mask;
    *fresh = s->slot[i] == 0;
    s->slot[i] = key;
    return i;
}

static void tidset_free(TidSet *s) {
    PyMem_Free(s->slot);
    PyMem_Free(s->val);
}

/* scan(records, templates) -> (tmap, count, lo, hi): the templates the hit records
 * name (a number missing from `templates` raises KeyError), the records they stand
 * for (a companion is one more), the least and greatest ts (0 and 0 for none). */
static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *records, *templates;
    if (!PyArg_ParseTuple(args, "OO!", &records, &PyDict_Type, &templates))
        return NULL;
    const unsigned char *p;
    Py_ssize_t n;
    if (hit_records(records, &p, &n) < 0)
        return NULL;
    PyObject *tmap = PyDict_New();
    if (tmap == NULL)
        return NULL;
    long long lo = 0, hi = 0;
    Py_ssize_t count = n;
    TidSet known; /* number -> its template, borrowed from tmap */
    if (tidset_init(&known, n) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++, p += HIT_SIZE) {
        unsigned long tid = (unsigned long)le(p + 16, 4);
        int fresh;
        size_t at = tidset_put(&known, tid, &fresh);
        if (fresh) {
            PyObject *key = PyLong_FromUnsignedLong(tid), *t = NULL;
            if (key != NULL && (t = template_at(templates, tid)) != NULL && PyDict_SetItem(tmap, key, t) < 0)
                t = NULL;
            Py_XDECREF(key);
            if (t == NULL) {
                tidset_free(&known);
                goto fail;
            }
            known.val[at] = (intptr_t)t;
        }
        long long ts = (long long)le(p, 8);
        lo = (i == 0 || ts < lo) ? ts : lo;
        hi = (i == 0 || ts > hi) ? ts : hi;
        count += PyTuple_GET_ITEM((PyObject *)known.val[at], 2) != Py_None;
    }
    tidset_free(&known);
    return Py_BuildValue("(NnLL)", tmap, count, lo, hi);
fail:
    Py_DECREF(tmap);
    return NULL;
}

/* expand(records, tmap) -> entries: the Copies entries of the hit records, in order. */
static PyObject *expand(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *records, *tmap;
    if (!PyArg_ParseTuple(args, "OO!", &records, &PyDict_Type, &tmap))
        return NULL;
    const unsigned char *p;
    Py_ssize_t n;
    if (hit_records(records, &p, &n) < 0)
        return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    unsigned long last = 0;
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++, p += HIT_SIZE) {
        unsigned long tid = (unsigned long)le(p + 16, 4);
        if (t == NULL || tid != last) {
            if ((t = template_at(tmap, tid)) == NULL)
                goto fail;
            last = tid;
        }
        PyObject *e = entry_of(t, p);
        if (e == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, e);
    }
    return out;
fail:
    Py_DECREF(out); /* unset items are NULL, which the list's dealloc skips */
    return NULL;
}

/* latest_hits(records, tmap, into) -> None: what latest(expand(records, tmap), into)
 * does (each entry moved to the end of `into` under id(its prototype)), but for each
 * template's last record alone, and with its entry's first three fields (proto,
 * companion, ts): what the DNS join learns from. */
static PyObject *latest_hits(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *records, *tmap, *into;
    if (!PyArg_ParseTuple(args, "OO!O!", &records, &PyDict_Type, &tmap, &PyDict_Type, &into))
        return NULL;
    const unsigned char *p;
    Py_ssize_t n;
    if (hit_records(records, &p, &n) < 0)
        return NULL;
    TidSet seen;
    Py_ssize_t *last = PyMem_Malloc(((size_t)n + 1) * sizeof *last), m = 0;
    if (last == NULL)
        return PyErr_NoMemory();
    if (tidset_init(&seen, n) < 0) {
        PyMem_Free(last);
        return NULL;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int fresh;
        tidset_put(&seen, (unsigned long)le(p + i * HIT_SIZE + 16, 4), &fresh);
        if (fresh)
            last[m++] = i;
    }
    tidset_free(&seen);
    for (Py_ssize_t j = m - 1; j >= 0; j--) { /* the latest records in their order */
        const unsigned char *r = p + last[j] * HIT_SIZE;
        PyObject *t = template_at(tmap, (unsigned long)le(r + 16, 4));
        PyObject *e = t ? Py_BuildValue("(OOL)", PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2),
                                        (long long)le(r, 8)) : NULL;
        PyObject *key = e ? PyLong_FromVoidPtr(PyTuple_GET_ITEM(t, 1)) : NULL;
        int ok = key != NULL;
        if (ok) {
            int has = PyDict_Contains(into, key);
            ok = has >= 0 && (has == 0 || PyDict_DelItem(into, key) == 0) &&
                 PyDict_SetItem(into, key, e) == 0;
        }
        Py_XDECREF(key);
        Py_XDECREF(e);
        if (!ok) {
            PyMem_Free(last);
            return NULL;
        }
    }
    PyMem_Free(last);
    Py_RETURN_NONE;
}

/* The records of one prototype (and companion) across a batch's packs. */
typedef struct {
    PyObject *proto, *companion; /* borrowed from the packs' tmaps */
    unsigned int *at;            /* (pack, record) pairs, in the packs' order */
    Py_ssize_t n, cap;
} HitGroup;

static int group_add(HitGroup *g, unsigned int pack, unsigned int rec) {
    if (g->n == g->cap) {
        Py_ssize_t cap = g->cap ? g->cap * 2 : 8;
        unsigned int *at = PyMem_Realloc(g->at, (size_t)cap * 2 * sizeof *at);
        if (at == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        g->at = at;
        g->cap = cap;
    }
    g->at[2 * g->n] = pack;
    g->at[2 * g->n + 1] = rec;
    g->n++;
    return 0;
}

/* group_hits(packs) -> [(proto, companion, at), ...] or None: the records of the packs
 * (a list of (records, tmap)) grouped by prototype in order of first appearance, each
 * group's `at` the (pack, record) pairs of its records in order, as native unsigned
 * ints. None where Python must group: copies of one prototype with different
 * companions. */
static PyObject *group_hits(PyObject *self, PyObject *packs) {
    (void)self;
    if (!PyList_CheckExact(packs)) {
        PyErr_SetString(PyExc_TypeError, "group_hits() takes a list of (records, tmap)");
        return NULL;
    }
    HitGroup *groups = NULL;
    Py_ssize_t ngroups = 0, capgroups = 0;
    PyObject *index = PyDict_New(), *out = NULL; /* id(proto) -> group number */
    if (index == NULL)
        return NULL;
    int python = 0;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(packs) && !python; j++) {
        PyObject *pk = PyList_GET_ITEM(packs, j), *tmap;
        if (!PyTuple_CheckExact(pk) || PyTuple_GET_SIZE(pk) != 2 ||
            !PyDict_CheckExact(tmap = PyTuple_GET_ITEM(pk, 1))) {
            PyErr_SetString(PyExc_TypeError, "a pack is (records, tmap)");
            goto fail;
        }
        const unsigned char *p;
        Py_ssize_t n;
        if (hit_records(PyTuple_GET_ITEM(pk, 0), &p, &n) < 0)
            goto fail;
        TidSet tids; /* template number -> group number, for this pack */
        if (tidset_init(&tids, n) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < n; i++, p += HIT_SIZE) {
            unsigned long tid = (unsigned long)le(p + 16, 4);
            int fresh;
            size_t s = tidset_put(&tids, tid, &fresh);
            if (fresh) {
                PyObject *t = template_at(tmap, tid), *key = NULL, *g = NULL;
                if (t == NULL || (key = PyLong_FromVoidPtr(PyTuple_GET_ITEM(t, 1))) == NULL)
                    goto fail_tids;
                g = PyDict_GetItemWithError(index, key);
                if (g == NULL && PyErr_Occurred()) {
                    Py_DECREF(key);
                    goto fail_tids;
                }
                if (g == NULL) {
                    if (ngroups == capgroups) {
                        Py_ssize_t cap = capgroups ? capgroups * 2 : 64;
                        HitGroup *more = PyMem_Realloc(groups, (size_t)cap * sizeof *more);
                        if (more == NULL) {
                            Py_DECREF(key);
                            PyErr_NoMemory();
                            goto fail_tids;
                        }
                        groups = more;
                        capgroups = cap;
                    }
                    groups[ngroups] = (HitGroup){PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2), NULL, 0, 0};
                    PyObject *num = PyLong_FromSsize_t(ngroups);
                    int bad = num == NULL || PyDict_SetItem(index, key, num) < 0;
                    Py_XDECREF(num);
                    Py_DECREF(key);
                    if (bad)
                        goto fail_tids;
                    tids.val[s] = (intptr_t)ngroups++;
                } else {
                    Py_DECREF(key);
                    tids.val[s] = (intptr_t)PyLong_AsSsize_t(g);
                    if (groups[tids.val[s]].companion != PyTuple_GET_ITEM(t, 2)) {
                        python = 1;
                        break;
                    }
                }
            }
            if (group_add(&groups[tids.val[s]], (unsigned int)j, (unsigned int)i) < 0)
                goto fail_tids;
        }
        tidset_free(&tids);
        continue;
    fail_tids:
        tidset_free(&tids);
        goto fail;
    }
    if (python) {
        out = Py_NewRef(Py_None);
    } else if ((out = PyList_New(ngroups)) != NULL) {
        for (Py_ssize_t k = 0; k < ngroups; k++) {
            HitGroup *g = &groups[k];
            PyObject *item = Py_BuildValue("(OOy#)", g->proto, g->companion, (const char *)g->at,
                                           (Py_ssize_t)(g->n * 2 * sizeof *g->at));
            if (item == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, k, item);
        }
    }
    goto done;
fail:
    out = NULL;
done:
    for (Py_ssize_t k = 0; k < ngroups; k++)
        PyMem_Free(groups[k].at);
    PyMem_Free(groups);
    Py_DECREF(index);
    return out;
}

/* segs[0] v[0] segs[1] ... v[n-1] segs[n] with v = (ts, uid, client_port, dns_id,
 * latency_us) of a hit: put_spliced for raw values. */
static int put_spliced_hit(Buf *b, PyObject *segs, const long long *v, const char *uid,
                           Py_ssize_t ulen, int n) {
    for (int k = 0; k < n; k++) {
        if (put_bytes(b, PyTuple_GET_ITEM(segs, k)) < 0)
            return -1;
        if ((k == 1 ? put_utf8(b, uid, ulen) : put_ll(b, v[k])) < 0)
            return -1;
    }
    return put_bytes(b, PyTuple_GET_ITEM(segs, n));
}

typedef struct {
    long long ts;
    Py_ssize_t k;
} TsAt;

static int by_ts(const void *a, const void *b) {
    const TsAt *x = a, *y = b;
    if (x->ts != y->ts)
        return x->ts < y->ts ? -1 : 1;
    return x->k < y->k ? -1 : x->k > y->k;
}

/* run_hits(packs, at, plans) -> (data, framed, n, lo, hi) or None: run() for one
 * group of group_hits() (its `at`), the records in ts order (ties in their order).
 * None where there is no plan for the group's prototype (Python's turn). */
static PyObject *run_hits(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *packs, *plans;
    Py_buffer at;
    if (!PyArg_ParseTuple(args, "O!y*O!", &PyList_Type, &packs, &at, &PyDict_Type, &plans))
        return NULL;
    const unsigned int *pairs = at.buf;
    Py_ssize_t n = at.len / (Py_ssize_t)(2 * sizeof *pairs), npacks = PyList_GET_SIZE(packs);
    TsAt *order = NULL;
    struct {
        unsigned long tid;
        const char *prefix;
        Py_ssize_t plen;
    } *pk = NULL;
    Buf f = {NULL, 0, 0}, d = {NULL, 0, 0};
    char small[UID_MAX], *uid = small;
    Py_ssize_t ucap = UID_MAX;
    PyObject *out = NULL;
    const unsigned char **base = PyMem_Calloc((size_t)npacks + 1, sizeof *base);
    if (n == 0 || base == NULL) {
        if (base == NULL)
            PyErr_NoMemory();
        else
            out = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t *sizes = PyMem_Calloc((size_t)npacks + 1, sizeof *sizes);
    if (sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < npacks; j++) {
        PyObject *pk = PyList_GET_ITEM(packs, j);
        if (!PyTuple_CheckExact(pk) || PyTuple_GET_SIZE(pk) != 2 ||
            !PyDict_CheckExact(PyTuple_GET_ITEM(pk, 1)) ||
            hit_records(PyTuple_GET_ITEM(pk, 0), &base[j], &sizes[j]) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "a pack is (records, tmap)");
            PyMem_Free(sizes);
            goto done;
        }
    }
    order = PyMem_Malloc((size_t)n * sizeof *order);
    if (order == NULL) {
        PyMem_Free(sizes);
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned int j = pairs[2 * k], i = pairs[2 * k + 1];
        if ((Py_ssize_t)j >= npacks || (Py_ssize_t)i >= sizes[j]) {
            PyMem_Free(sizes);
            PyErr_SetString(PyExc_IndexError, "a record outside the packs");
            goto done;
        }
        order[k] = (TsAt){(long long)le(base[j] + (size_t)i * HIT_SIZE, 8), k};
    }
    PyMem_Free(sizes);
    /* Each worker's records come in ts order: often the group is in order already. */
    for (Py_ssize_t k = 1; k < n; k++) {
        if (order[k].ts < order[k - 1].ts) {
            qsort(order, (size_t)n, sizeof *order, by_ts);
            break;
        }
    }
    /* The group's prototype, from its first record's template. */
    unsigned int j0 = pairs[0];
    PyObject *t0 = template_at(PyTuple_GET_ITEM(PyList_GET_ITEM(packs, j0), 1),
                               (unsigned long)le(base[j0] + (size_t)pairs[1] * HIT_SIZE + 16, 4));
    if (t0 == NULL)
        goto done;
    PyObject *plan = NULL;
    int got_plan = plan_of(plans, PyTuple_GET_ITEM(t0, 1), PyTuple_GET_ITEM(t0, 2), &plan);
    if (got_plan <= 0) {
        out = got_plan < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    PyObject *segs = PyTuple_GET_ITEM(plan, 3), *comp = PyTuple_GET_ITEM(plan, 5);
    Py_ssize_t fixed = 0; /* the prototype's bytes in each copy's logical row */
    for (Py_ssize_t q = 0; q < PyTuple_GET_SIZE(segs); q++)
        fixed += PyBytes_GET_SIZE(PyTuple_GET_ITEM(segs, q));
    if (comp != Py_None)
        for (Py_ssize_t q = 0; q < PyTuple_GET_SIZE(PyTuple_GET_ITEM(comp, 1)); q++)
            fixed += PyBytes_GET_SIZE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(comp, 1), q));
    /* One allocation each, mostly: a copy's values take under 64 bytes but for the uid. */
    if (grow(&f, n * (fixed + 2 * 64 + 8)) < 0 || grow(&d, 5 + n * 64) < 0 || put_array_head(&d, n) < 0)
        goto done;
    /* Each pack's last template number and uid prefix: a group's copies alternate
     * between packs (the workers), each naming its prototype by one number. */
    pk = PyMem_Calloc((size_t)npacks, sizeof *pk);
    if (pk == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned int j = pairs[2 * order[k].k];
        const unsigned char *r = base[j] + (size_t)pairs[2 * order[k].k + 1] * HIT_SIZE;
        unsigned long tid = (unsigned long)le(r + 16, 4);
        if (pk[j].prefix == NULL || tid != pk[j].tid) {
            PyObject *t = template_at(PyTuple_GET_ITEM(PyList_GET_ITEM(packs, j), 1), tid);
            if (t == NULL || (pk[j].prefix = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(t, 0), &pk[j].plen)) == NULL)
                goto done;
            if (PyTuple_GET_ITEM(t, 1) != PyTuple_GET_ITEM(t0, 1) ||
                PyTuple_GET_ITEM(t, 2) != PyTuple_GET_ITEM(t0, 2)) {
                PyErr_SetString(PyExc_ValueError, "a group's records name another prototype");
                goto done;
            }
            if (pk[j].plen + 17 > ucap) { /* a long prefix: a buffer that holds it */
                char *more = PyMem_Realloc(uid == small ? NULL : uid, (size_t)pk[j].plen + 17);
                if (more == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                uid = more;
                ucap = pk[j].plen + 17;
            }
            pk[j].tid = tid;
        }
        Py_ssize_t ulen = uid_of(uid, pk[j].prefix, pk[j].plen, le(r + 8, 8));
        long long v[5] = {order[k].ts, 0, (long long)le(r + 20, 2), (long long)le(r + 22, 2),
                          (long long)le(r + 24, 4)};
        for (int part = 0; part < (comp != Py_None ? 2 : 1); part++) {
            Py_ssize_t mark = f.n;
            if (put(&f, "\0\0\0\0", 4) < 0 ||
                put_spliced_hit(&f, part == 0 ? segs : PyTuple_GET_ITEM(comp, 1), v, uid, ulen,
                                part == 0 ? 5 : 3) < 0)
                goto done;
            patch_length(&f, mark);
        }
        char head = (char)0x95;
        if (put(&d, &head, 1) < 0)
            goto done;
        for (int q = 0; q < 5; q++)
            if ((q == 1 ? put_utf8(&d, uid, ulen) : put_ll(&d, v[q])) < 0)
                goto done;
    }
    out = Py_BuildValue("(y#y#nLL)", d.p, d.n, f.p, f.n, n, order[0].ts, order[n - 1].ts);
done:
    if (uid != small)
        PyMem_Free(uid);
    PyMem_Free(pk);
    PyMem_Free(order);
    PyMem_Free(base);
    PyMem_Free(f.p);
    PyMem_Free(d.p);
    PyBuffer_Release(&at);
    return out;
}

static PyMethodDef methods[] = {
    {"latest", latest, METH_VARARGS, "latest(entries, into): each entry moved to the end of into"},
    {"group", group, METH_O, "group(lists) -> entries grouped by prototype, or None"},
    {"frame", frame, METH_O, "frame(rows) -> each row after its length (4 bytes, big-endian)"},
    {"rows", rows, METH_VARARGS, "rows(entries, start, plans, row_id, logical) -> (rows, stop)"},
    {"run", run, METH_VARARGS, "run(entries, plans) -> (data, framed) or None"},
    {"scan", scan, METH_VARARGS, "scan(records, templates) -> (tmap, count, lo, hi)"},
    {"expand", expand, METH_VARARGS, "expand(records, tmap) -> entries"},
    {"latest_hits", latest_hits, METH_VARARGS, "latest_hits(records, tmap, into): latest(expand(...), into)"},
    {"group_hits", group_hits, METH_O, "group_hits(packs) -> [(proto, companion, at)] or None"},
    {"run_hits", run_hits, METH_VARARGS, "run_hits(packs, at, plans) -> (data, framed, n, lo, hi) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "storage._copies", "The rows of storage.schema.Copies, built in C.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copies(void) { return PyModule_Create(&module); }
