/* rules._htmlscan: UTF-8 HTML bytes -> normalised text runs (UTF-8), in one C pass.
 *
 * The compiled form of rules.html.HtmlText followed by rules.normalize.Normalizer, for
 * the common case: it must give the same normalised text as that Python path (the
 * reference; tests/rules/test_htmlscan.py holds the two equal), and where it cannot,
 * it says so and changes nothing, so that its state can be handed to the Python path
 * (rules/htmlscan.py does that). It declines (returns None) on:
 *   - a character whose normalisation composes or reorders with a neighbour ("complex",
 *     rules.normalize), since its result depends on the characters around it;
 *   - NUL and U+0001 in the input (the Python path drops or uses them);
 *   - a tag that can never finish (over-long, or cut by the end of input), which the
 *     Python path ends at its first '>' (HtmlText._force_tag_end).
 * Invalid UTF-8 gives the status INVALID instead (the caller switches to replacement).
 *
 * Markup follows rules.html._FAST alternative by alternative (tags with quoted
 * attributes, comments, raw-text elements, bogus comments, "stops" at unfinished
 * markup); character references are decoded by the Python callable given (html.unescape)
 * one text span at a time; normalisation is a per-code-point table built by
 * rules.normalize (replacement, ignorable, complex, "non-inert": may combine with what
 * follows, so it is held back at the end of a feed, as Normalizer does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F_CHANGES 0x01u
#define F_COMPLEX 0x02u
#define F_NONINERT 0x04u
#define F_IGNORABLE 0x08u

#define ST_DATA 0
#define ST_COMMENT 1
#define ST_RAW 2 /* ST_RAW + index into raw names */

#define MAX_RAW 8
#define MAX_BLOCK 128
#define HOLD_MAX 32      /* rules.normalize.MAX_HOLDBACK */
#define HELD_BYTES (4 * (HOLD_MAX + 2))

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    PyObject *bytes; /* when set, p is this bytes object's buffer (the feed's result) */
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    if (b->bytes) {
        if (_PyBytes_Resize(&b->bytes, cap) < 0) { b->p = NULL; b->len = b->cap = 0; return -1; }
        b->p = PyBytes_AS_STRING(b->bytes);
        b->cap = cap;
        return 0;
    }
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* A buffer written straight into a new bytes object: the result needs no copy. */
static int buf_bytes(Buf *b, Py_ssize_t cap) {
    b->bytes = PyBytes_FromStringAndSize(NULL, cap);
    if (!b->bytes) return -1;
    b->p = PyBytes_AS_STRING(b->bytes);
    b->len = 0;
    b->cap = cap;
    return 0;
}

/* The bytes object, cut to what was written (NULL on failure); the buffer is emptied. */
static PyObject *buf_take_bytes(Buf *b) {
    PyObject *out = b->bytes;
    b->bytes = NULL;
    b->p = NULL;
    if (out && _PyBytes_Resize(&out, b->len) < 0) out = NULL;
    b->len = b->cap = 0;
    return out;
}

/* memcpy for the short pieces between tags (most are under 32 bytes), without a call:
 * two fixed-size copies that may overlap. */
static inline void copy_short(char *d, const char *s, Py_ssize_t n) {
    if (n >= 16 && n <= 32) {
        char a[16], b[16];
        memcpy(a, s, 16);
        memcpy(b, s + n - 16, 16);
        memcpy(d, a, 16);
        memcpy(d + n - 16, b, 16);
    } else if (n >= 8 && n < 16) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n < 8) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = s[i];
    } else {
        memcpy(d, s, (size_t)n);
    }
}

static inline int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (n <= 0) return 0;
    if (b->len + n > b->cap && buf_reserve(b, n) < 0) return -1;
    copy_short(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static void buf_free(Buf *b) {
    if (b->bytes) Py_CLEAR(b->bytes);
    else PyMem_Free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

typedef struct {
    PyObject_HEAD
    /* tables (read-only, shared by every feed) */
    PyObject *top_obj, *blocks_obj, *repl_obj, *unescape, *plain_obj;
    const unsigned char *plain; /* BMP bitmap: the character neither changes, drops nor is complex */
    const unsigned char *plain3; /* the same without what three bytes cannot encode (< U+0800, surrogates) */
    unsigned char ascii_plain[128]; /* the same for ASCII */
    unsigned char ascii_run[128];   /* ascii_plain, but not '<' and '&' (markup, references) */
    const uint16_t *top;     /* code point >> 8 -> block number (0: nothing changes) */
    const uint32_t *blocks;  /* block * 256 + (cp & 255) -> flags << 24 | repl offset */
    const unsigned char *repl; /* at offset: length byte, then the UTF-8 replacement */
    Py_ssize_t nblocks, repl_len, max_tag;
    char raw_names[MAX_RAW][16];
    int raw_len[MAX_RAW], nraw;
    char block_names[MAX_BLOCK][16];
    int block_len[MAX_BLOCK], nblock;
    int block_first[27]; /* names sorted: where those starting with 'a' + i begin */
    uint64_t block_word[MAX_BLOCK]; /* pack8 of names up to 8 bytes, else 0 */
    uint64_t raw_word[MAX_RAW];     /* the same for the raw-text names */
    /* state between feeds */
    Buf carry;          /* unconsumed input: an unfinished tag, entity, or a skip tail */
    int carry_is_tag;
    int state;
    int in_run;         /* normalised text since the last run break */
    char held_in[HELD_BYTES]; /* text held back by the normaliser (UTF-8, not normalised) */
    int held_in_len;
    char held_out[128];  /* its normalised form */
    int held_out_len;
    int held_ign;       /* ignorables at the end of held_in */
    char pending[4];    /* an incomplete UTF-8 character at the end of the last input */
    int pending_len;
    Py_ssize_t chars;   /* characters in the last output */
    /* scratch */
    Buf in;
} Scanner;

/* One feed's changing state, committed only when the feed succeeds. */
typedef struct {
    Scanner *s;
    Buf *out;
    int state, in_run, bail, invalid, carry_is_tag;
    Py_ssize_t carry_from; /* the input from here on is carried to the next feed */
    Py_ssize_t ni_out;  /* out length before the last non-ignorable char, -1: none */
    int ni_hold;        /* that char is non-inert; -1: not looked up yet (see held_lazy) */
    const char *held_lazy; /* when set, held_in is this char (in the input), not yet copied */
    int held_lazy_len;
    int trail_ign;      /* ignorables after it */
    char held_in[HELD_BYTES];
    int held_in_len;
    Py_ssize_t chars;
} Feed;

static inline int is_ws(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\f' || c == '\r';
}
static inline int is_alpha(unsigned char c) {
    return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
}
static inline unsigned char lower(unsigned char c) {
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c | 0x20) : c;
}

static inline uint32_t entry_of(const Scanner *s, uint32_t cp) {
    uint16_t blk = s->top[cp >> 8];
    return blk ? s->blocks[(Py_ssize_t)blk * 256 + (cp & 255)] : 0;
}

/* ---- normalisation of one code point ---------------------------------------------- */

static inline int utf8_len_of(uint32_t cp) {
    return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
}

static inline int decode_at(const unsigned char *p, Py_ssize_t j, Py_ssize_t n, uint32_t *cp);

/* The held character, copied out of the input (before ignorables are appended to it). */
static void materialize(Feed *f) {
    memcpy(f->held_in, f->held_lazy, (size_t)f->held_lazy_len);
    f->held_in_len = f->held_lazy_len;
    f->held_lazy = NULL;
}

/* Whether the held character may combine with what follows (looked up once, at the end). */
static int held_noninert(Feed *f) {
    if (f->ni_hold < 0) {
        uint32_t cp = 0;
        const unsigned char *b = (const unsigned char *)(f->held_lazy ? f->held_lazy : f->held_in);
        decode_at(b, 0, f->held_lazy ? f->held_lazy_len : f->held_in_len, &cp);
        f->ni_hold = ((entry_of(f->s, cp) >> 24) & F_NONINERT) != 0;
    }
    return f->ni_hold;
}

/* An ignorable character after the held one: it is held too (Normalizer holds from the
 * last character that is not ignorable), lazily while it follows in the input. */
static inline void held_ignorable(Feed *f, const char *src, int len) {
    f->trail_ign++;
    if (f->ni_out < 0 || f->trail_ign > HOLD_MAX) return;
    if (f->held_lazy) {
        if (f->held_lazy + f->held_lazy_len == src && f->held_lazy_len + len <= HELD_BYTES) {
            f->held_lazy_len += len;
            return;
        }
        materialize(f);
    }
    if (f->held_in_len + len <= HELD_BYTES) {
        memcpy(f->held_in + f->held_in_len, src, (size_t)len);
        f->held_in_len += len;
    }
}

static int emit_cp(Feed *f, uint32_t cp, const char *src, int srclen) {
    Scanner *s = f->s;
    uint32_t e = entry_of(s, cp);
    unsigned flags = e >> 24;
    if (flags & F_COMPLEX) { f->bail = 1; return 0; }
    if (flags & F_IGNORABLE) {
        held_ignorable(f, src, srclen);
        return 0;
    }
    f->ni_out = f->out->len;
    f->ni_hold = (flags & F_NONINERT) != 0;
    f->trail_ign = 0;
    f->held_lazy = NULL;
    memcpy(f->held_in, src, (size_t)srclen);
    f->held_in_len = srclen;
    f->in_run = 1;
    if (flags & F_CHANGES) {
        const unsigned char *r = s->repl + (e & 0xFFFFFFu);
        if (buf_put(f->out, (const char *)r + 1, r[0]) < 0) return -1;
        /* characters of the replacement */
        for (int i = 1; i <= r[0]; i++) f->chars += (r[i] & 0xC0) != 0x80;
        return 0;
    }
    f->chars++;
    return buf_put(f->out, src, srclen);
}

/* The normaliser's end of a run: nothing is held back across a break. */
static inline void settle(Feed *f) {
    f->ni_out = -1;
    f->trail_ign = 0;
    f->held_in_len = 0;
    f->held_lazy = NULL;
}

static int run_break(Feed *f) {
    settle(f);
    if (f->in_run) {
        f->in_run = 0;
        f->chars++;
        return buf_put(f->out, "\0", 1);
    }
    return 0;
}

static inline int cont(unsigned char c) { return (c & 0xC0) == 0x80; }

static inline uint32_t le32(uint32_t w) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_bswap32(w);
#else
    return w;
#endif
}

/* The code point at p[j] (and its length), or 0 length for invalid UTF-8 (as strict
 * decoding would reject it: overlong forms, surrogates, past U+10FFFF, truncated). */
static inline int decode_at(const unsigned char *p, Py_ssize_t j, Py_ssize_t n, uint32_t *cp) {
    unsigned char c = p[j];
    if (c < 0x80) { *cp = c; return 1; }
    if (c < 0xC2) return 0;
    if (c < 0xE0) {
        if (j + 1 >= n || !cont(p[j + 1])) return 0;
        *cp = ((uint32_t)(c & 0x1F) << 6) | (p[j + 1] & 0x3F);
        return 2;
    }
    if (c < 0xF0) {
        if (j + 2 >= n || !cont(p[j + 1]) || !cont(p[j + 2])) return 0;
        if ((c == 0xE0 && p[j + 1] < 0xA0) || (c == 0xED && p[j + 1] > 0x9F)) return 0;
        *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(p[j + 1] & 0x3F) << 6) | (p[j + 2] & 0x3F);
        return 3;
    }
    if (c > 0xF4 || j + 3 >= n || !cont(p[j + 1]) || !cont(p[j + 2]) || !cont(p[j + 3])) return 0;
    if ((c == 0xF0 && p[j + 1] < 0x90) || (c == 0xF4 && p[j + 1] > 0x8F)) return 0;
    *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(p[j + 1] & 0x3F) << 12)
          | ((uint32_t)(p[j + 2] & 0x3F) << 6) | (p[j + 3] & 0x3F);
    return 4;
}

static inline int is_plain(const Scanner *s, uint32_t cp) {
    if (cp < 0x10000) return (s->plain[cp >> 3] >> (cp & 7)) & 1;
    return ((entry_of(s, cp) >> 24) & ~F_NONINERT) == 0;
}

enum { M_TEXT, M_TAG, M_SKIP, M_STOP_TAG, M_STOP_END, M_STOP_COMMENT, M_STOP_RAW };

typedef struct {
    int kind;
    Py_ssize_t end;
    int block;
    int raw;
} Markup;

static Markup markup_at(const Scanner *sc, const unsigned char *s, Py_ssize_t lt, Py_ssize_t n);
static inline void check_range(Feed *f, const unsigned char *s, Py_ssize_t from, Py_ssize_t to);
static int run_break(Feed *f);

/* A name of at most 8 bytes as one word, ASCII letters lower-cased by setting bit 5:
 * a cheap first test against the block names (a few control bytes also turn into
 * digits, so a hit is confirmed by name_is). */
static inline uint64_t pack8(const unsigned char *p, Py_ssize_t len, const unsigned char *end) {
    uint64_t w = 0;
    if (p + 8 <= end) { /* one load (a variable-length copy stalls on store forwarding) */
        memcpy(&w, p, 8);
        if (len < 8) w &= (1ull << (8 * len)) - 1;
    } else {
        for (Py_ssize_t i = 0; i < len; i++) w |= (uint64_t)p[i] << (8 * i);
    }
    return w | (0x2020202020202020ull >> (8 * (8 - len)));
}

/* The block name an all-letter name of 1 to 8 bytes (where pack8 is exact) is, or -1. */
static inline int block_word_index(const Scanner *s, const unsigned char *tok, Py_ssize_t len,
                                   const unsigned char *end) {
    uint64_t w = pack8(tok, len, end);
    int letter = (tok[0] | 0x20) - 'a';
    for (int i = s->block_first[letter]; i < s->block_first[letter + 1]; i++)
        if (s->block_word[i] == w) return i;
    return -1;
}

/* Whether an all-letter name of 1 to 8 bytes names a raw-text element (script...). */
static inline int is_raw_letters(const Scanner *s, const unsigned char *tok, Py_ssize_t len,
                                 const unsigned char *end) {
    if ((tok[0] | 0x20) != 's' && (tok[0] | 0x20) != 'n') return 0; /* all raw names do */
    uint64_t w = pack8(tok, len, end);
    for (int i = 0; i < s->nraw; i++)
        if (s->raw_word[i] == w) return 1;
    return 0;
}

/* A run of plain three-byte characters from j (nearly all of a CJK page): where it ends.
 * One 4-byte load checks the lead and continuation bytes; overlong forms and surrogates
 * are not in `plain3`, so anything unusual ends the run and the general decoding (which
 * rejects invalid UTF-8) takes it. Few live values, so that they all stay in registers. */
static inline Py_ssize_t run3(const unsigned char *p, Py_ssize_t j, Py_ssize_t n,
                              const unsigned char *plain3, Py_ssize_t *last, Py_ssize_t *nch) {
    Py_ssize_t start = j;
    while (j + 3 < n) {
        uint32_t w;
        memcpy(&w, p + j, 4);
        w = le32(w);
        if ((w & 0x00C0C0F0u) != 0x008080E0u) break;
        uint32_t cp = ((w & 0x0Fu) << 12) | ((w >> 2) & 0xFC0u) | ((w >> 16) & 0x3Fu);
        if (!((plain3[cp >> 3] >> (cp & 7)) & 1)) break;
        j += 3;
    }
    if (j > start) {
        *last = j - 3;
        *nch += (j - start) / 3;
    }
    return j;
}

/* Output of a run of plain characters p[i:j] whose last one starts at `last`. */
static inline int flush_run(Feed *f, const unsigned char *p, Py_ssize_t i, Py_ssize_t j,
                            Py_ssize_t last, Py_ssize_t nch) {
    if (j <= i) return 0;
    f->ni_out = f->out->len + (last - i);
    f->ni_hold = -1;
    f->trail_ign = 0;
    f->held_lazy = (const char *)p + last;
    f->held_lazy_len = (int)(j - last);
    f->in_run = 1;
    f->chars += nch;
    return buf_put(f->out, (const char *)p + i, j - i);
}

/* UTF-8 text -> normalised output, checking the UTF-8 as it goes (f->invalid). With
 * `stops` it reads a data-state text: tags and comments inside it are handled here (most
 * markup), and it returns where a '&' or other markup (unfinished, raw text) is, for
 * tokenize; n when it reached the end. Runs of characters that neither change nor drop
 * (nearly all of a page) are found with tables that stay in L1 and copied at once.
 * Returns -1 on a Python error. */
static Py_ssize_t emit_until(Feed *f, const unsigned char *p, Py_ssize_t n, int stops) {
    Scanner *s = f->s;
    const unsigned char *cls = stops ? s->ascii_run : s->ascii_plain;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t j = i, last = i, nch = 0;
        uint32_t cp = 0;
        int len = 1;
        while (j < n) {
            unsigned char c = p[j];
            if ((c & 0xF0) == 0xE0 && j + 2 < n) { /* CJK and most other BMP text */
                Py_ssize_t k = run3(p, j, n, s->plain3, &last, &nch);
                if (k > j) { j = k; continue; }
                /* p[j] ends the run (or is invalid): the general decoding says which */
                if (!(len = decode_at(p, j, n, &cp))) { f->invalid = 1; return n; }
                break;
            } else if (c < 0x80) {
                unsigned k = cls[c];
                len = 1;
                if (k == 2) { /* ignorable ASCII (spaces, separators): dropped right here */
                    if (flush_run(f, p, i, j, last, nch) < 0) return -1;
                    nch = 0;
                    held_ignorable(f, (const char *)p + j, 1);
                    i = ++j;
                    continue;
                }
                if (!k) {
                    if (c != '<' || !stops) { cp = c; break; }
                    /* Markup inside the text: tags and comments are handled right here,
                     * the rest (unfinished markup, raw text, stops) by tokenize. First
                     * the commonest, <name> and </name> with a short name that is not
                     * raw text, without the general alternatives. */
                    int end_tag = j + 1 < n && p[j + 1] == '/';
                    Py_ssize_t t = j + 1 + end_tag, e = t;
                    while (e < n && e - t < 8 && is_alpha(p[e])) e++;
                    if (e > t && e < n && p[e] == '>' && (end_tag || !is_raw_letters(s, p + t, e - t, p + n))) {
                        if (flush_run(f, p, i, j, last, nch) < 0) return -1;
                        nch = 0;
                        if (block_word_index(s, p + t, e - t, p + n) >= 0 && run_break(f) < 0) return -1;
                        i = j = e + 1;
                        continue;
                    }
                    Markup m = markup_at(s, p, j, n);
                    if (m.kind == M_TEXT) { /* "<" that opens nothing is text */
                        last = j++;
                        nch++;
                        continue;
                    }
                    if (flush_run(f, p, i, j, last, nch) < 0) return -1;
                    nch = 0;
                    if (m.kind != M_TAG && m.kind != M_SKIP) return j;
                    check_range(f, p, j, m.end);
                    if (f->invalid || f->bail) return n;
                    if (m.kind == M_TAG && m.block && run_break(f) < 0) return -1;
                    i = j = m.end;
                    continue;
                }
            } else {
                if (!(len = decode_at(p, j, n, &cp))) { f->invalid = 1; return n; }
                if (!is_plain(s, cp)) break;
            }
            last = j;
            j += len;
            nch++;
        }
        if (flush_run(f, p, i, j, last, nch) < 0) return -1;
        if (j >= n) return n;
        if (cp < 2 && p[j] == cp) { f->bail = 1; return n; } /* NUL, U+0001: the Python path's */
        if (stops && cp == '&' && p[j] == '&') return j;
        if (emit_cp(f, cp, (const char *)p + j, len) < 0) return -1;
        if (f->bail) return n;
        i = j + len;
    }
    return n;
}

static inline int emit_utf8(Feed *f, const unsigned char *p, Py_ssize_t n) {
    return emit_until(f, p, n, 0) < 0 ? -1 : 0;
}

static int emit_unicode(Feed *f, PyObject *text) {
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    for (Py_ssize_t i = 0; i < n && !f->bail; i++) {
        uint32_t cp = PyUnicode_READ(kind, data, i);
        char tmp[4];
        int len = utf8_len_of(cp);
        if ((cp >= 0xD800 && cp < 0xE000) || cp == 0 || cp == 1) { f->bail = 1; break; }
        switch (len) {
        case 1: tmp[0] = (char)cp; break;
        case 2: tmp[0] = (char)(0xC0 | (cp >> 6)); tmp[1] = (char)(0x80 | (cp & 0x3F)); break;
        case 3: tmp[0] = (char)(0xE0 | (cp >> 12)); tmp[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                tmp[2] = (char)(0x80 | (cp & 0x3F)); break;
        default: tmp[0] = (char)(0xF0 | (cp >> 18)); tmp[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
                 tmp[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); tmp[3] = (char)(0x80 | (cp & 0x3F));
        }
        if (emit_cp(f, cp, tmp, len) < 0) return -1;
    }
    return 0;
}

/* A text span of the markup (character references decoded, as HtmlText does). */
static int emit_text(Feed *f, const unsigned char *p, Py_ssize_t n) {
    if (n <= 0) return 0;
    if (!memchr(p, '&', (size_t)n)) return emit_utf8(f, p, n);
    if (f->held_lazy) materialize(f); /* the text below comes from a temporary buffer */
    PyObject *raw = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
    if (!raw) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return -1;
        PyErr_Clear();
        f->invalid = 1;
        return 0;
    }
    PyObject *text = PyObject_CallOneArg(f->s->unescape, raw);
    Py_DECREF(raw);
    if (!text) return -1;
    if (!PyUnicode_Check(text)) {
        Py_DECREF(text);
        PyErr_SetString(PyExc_TypeError, "unescape must return str");
        return -1;
    }
    int rc = emit_unicode(f, text);
    Py_DECREF(text);
    return rc;
}

/* ---- input checks ------------------------------------------------------------------ */

/* Length of the valid UTF-8 prefix that ends on a character boundary; *incomplete gets
 * the length of a truncated character at the very end (valid so far), *bad is set when
 * an invalid sequence was found (the prefix then stops before it). */
static Py_ssize_t utf8_check(const unsigned char *p, Py_ssize_t n, int *incomplete, int *bad) {
    Py_ssize_t i = 0;
    *incomplete = 0;
    *bad = 0;
    while (i < n) {
        if (p[i] < 0x80) {
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, p + i, 8);
                if (w & 0x8080808080808080ull) break;
                i += 8;
            }
            while (i < n && p[i] < 0x80) i++;
            continue;
        }
        unsigned char c = p[i];
        int len;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            else if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            else if (c == 0xF4) hi = 0x8F;
        } else { *bad = 1; return i; }
        for (int k = 1; k < len; k++) {
            if (i + k >= n) { *incomplete = (int)(n - i); return i; }
            unsigned char d = p[i + k];
            if (k == 1 ? (d < lo || d > hi) : (d & 0xC0) != 0x80) { *bad = 1; return i; }
        }
        i += len;
    }
    return i;
}

/* Every byte the scanner passes over is checked once: text as it is decoded, the rest
 * (markup, skipped contents, carried input) here. */
static inline void check_range(Feed *f, const unsigned char *s, Py_ssize_t from, Py_ssize_t to) {
    int inc, bad, ascii = 1;
    for (Py_ssize_t i = from; i < to; i++) {
        if (s[i] < 2) { f->bail = 1; return; } /* NUL and U+0001: the Python path's */
        ascii &= s[i] < 0x80;
    }
    if (!ascii) {
        utf8_check(s + from, to - from, &inc, &bad);
        if (bad || inc) f->invalid = 1;
    }
}

/* Where the input stops being whole characters: a truncated character at the very end
 * (valid so far) is left for the next input; *bad when those last bytes are invalid. */
static Py_ssize_t whole_chars(const unsigned char *p, Py_ssize_t n, int *incomplete, int *bad) {
    Py_ssize_t k = n;
    *incomplete = *bad = 0;
    while (k > 0 && n - k < 3 && (p[k - 1] & 0xC0) == 0x80) k--;
    if (k == 0) return n;
    unsigned char lead = p[k - 1];
    int need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (need <= n - (k - 1)) return n;
    utf8_check(p + k - 1, n - (k - 1), incomplete, bad);
    return *bad ? n : k - 1;
}

/* ---- markup (rules.html._FAST) ---------------------------------------------------- */

static const unsigned char *find_any3(const unsigned char *p, const unsigned char *e) {
    while (p < e && *p != '>' && *p != '"' && *p != '\'') p++;
    return p;
}

/* _VALUE; returns the end, or -1 when it does not match. */
static Py_ssize_t attr_value(const unsigned char *s, Py_ssize_t q, Py_ssize_t n) {
    if (q >= n) return -1;
    unsigned char c = s[q];
    if (c == '"' || c == '\'') {
        const unsigned char *close = memchr(s + q + 1, c, (size_t)(n - q - 1));
        return close ? close - s + 1 : -1;
    }
    if (c == '>') return q; /* (?=>) */
    if (is_ws(c)) return -1;
    q++;
    while (q < n && !is_ws(s[q]) && s[q] != '>') q++;
    return q;
}

static inline int name_char(unsigned char c) {
    return !is_ws(c) && c != '/' && c != '>' && c != '=';
}

/* _ATTRS (possessive): how far it runs from p. */
static Py_ssize_t attrs(const unsigned char *s, Py_ssize_t p, Py_ssize_t n) {
    while (p < n) {
        unsigned char c = s[p];
        if (is_ws(c) || c == '/') {
            while (p < n && (is_ws(s[p]) || s[p] == '/')) p++;
            continue;
        }
        if (name_char(c)) {
            while (p < n && name_char(s[p])) p++;
            Py_ssize_t q = p;
            while (q < n && is_ws(s[q])) q++;
            if (q < n && s[q] == '=') {
                q++;
                while (q < n && is_ws(s[q])) q++;
                Py_ssize_t v = attr_value(s, q, n);
                if (v >= 0) p = v;
            }
            continue;
        }
        if (c == '=') {
            Py_ssize_t q = p + 1;
            while (q < n && is_ws(s[q])) q++;
            if (q < n && (s[q] == '"' || s[q] == '\'')) break;
            p++;
            while (p < n && name_char(s[p])) p++;
            continue;
        }
        break; /* '>' */
    }
    return p;
}

/* (?:>|[^>"']*+>|_ATTRS>) after a tag name; the end, or -1. */
static Py_ssize_t tag_tail(const unsigned char *s, Py_ssize_t p, Py_ssize_t n) {
    const unsigned char *q = find_any3(s + p, s + n);
    if (q < s + n && *q == '>') return q - s + 1;
    Py_ssize_t a = attrs(s, p, n);
    return (a < n && s[a] == '>') ? a + 1 : -1;
}

static int name_is(const unsigned char *p, Py_ssize_t len, const char *name, int nlen) {
    if (len != nlen) return 0;
    for (int i = 0; i < nlen; i++)
        if (lower(p[i]) != (unsigned char)name[i]) return 0;
    return 1;
}

static int is_block(const Scanner *s, const unsigned char *tok, Py_ssize_t len, const unsigned char *end) {
    if (len > 0 && tok[0] == '/') { tok++; len--; }
    if (len <= 0 || len > 15 || !is_alpha(tok[0])) return 0;
    if (len <= 8) { /* any bytes here: a word match is confirmed (see pack8) */
        int i = block_word_index(s, tok, len, end);
        return i >= 0 && name_is(tok, len, s->block_names[i], s->block_len[i]);
    }
    int letter = (tok[0] | 0x20) - 'a';
    for (int i = s->block_first[letter]; i < s->block_first[letter + 1]; i++)
        if (s->block_len[i] == len && name_is(tok, len, s->block_names[i], s->block_len[i])) return 1;
    return 0;
}

static Py_ssize_t find_gt(const unsigned char *s, Py_ssize_t p, Py_ssize_t n) {
    if (p >= n) return -1;
    const unsigned char *g = memchr(s + p, '>', (size_t)(n - p));
    return g ? g - s : -1;
}

/* "--" then ">" or "!>", from p: the end of the comment, or -1. */
static Py_ssize_t comment_end(const unsigned char *s, Py_ssize_t p, Py_ssize_t n) {
    while (p + 2 < n) {
        const unsigned char *d = memchr(s + p, '-', (size_t)(n - p));
        if (!d) return -1;
        Py_ssize_t i = d - s;
        if (i + 2 < n && s[i + 1] == '-') {
            if (s[i + 2] == '>') return i + 3;
            if (s[i + 2] == '!' && i + 3 < n && s[i + 3] == '>') return i + 4;
        }
        p = i + 1;
    }
    return -1;
}

static Markup markup_at(const Scanner *sc, const unsigned char *s, Py_ssize_t lt, Py_ssize_t n) {
    Markup m = {M_TEXT, 0, 0, -1};
    Py_ssize_t p = lt + 1;
    if (p >= n) { m.kind = M_STOP_END; return m; }
    unsigned char c = s[p];
    if (c == '/') {
        if (p + 1 < n && is_alpha(s[p + 1])) {
            Py_ssize_t t = p + 2;
            while (t < n && !is_ws(s[t]) && s[t] != '/' && s[t] != '>') t++;
            Py_ssize_t e = tag_tail(s, t, n);
            if (e < 0) { m.kind = M_STOP_TAG; return m; }
            m.kind = M_TAG; m.end = e; m.block = is_block(sc, s + p, t - p, s + n);
            return m;
        }
        Py_ssize_t g = find_gt(s, p + 1, n);
        if (g < 0) { m.kind = M_STOP_TAG; return m; }
        m.kind = M_SKIP; m.end = g + 1;
        return m;
    }
    if (is_alpha(c)) {
        Py_ssize_t t = p + 1;
        while (t < n && !is_ws(s[t]) && s[t] != '/' && s[t] != '>') t++;
        int raw = -1;
        if (t < n && ((c | 0x20) == 'n' || (c | 0x20) == 's'))
            for (int i = 0; i < sc->nraw; i++)
                if (name_is(s + p, t - p, sc->raw_names[i], sc->raw_len[i])) { raw = i; break; }
        if (raw < 0) {
            Py_ssize_t e = tag_tail(s, t, n);
            if (e < 0) { m.kind = M_STOP_TAG; return m; }
            m.kind = M_TAG; m.end = e; m.block = is_block(sc, s + p, t - p, s + n);
            return m;
        }
        Py_ssize_t a = attrs(s, t, n);
        if (a < n && s[a] == '>') { m.kind = M_STOP_RAW; m.end = a + 1; m.raw = raw; return m; }
        m.kind = M_STOP_TAG;
        return m;
    }
    if (c == '!') {
        if (p + 2 < n && s[p + 1] == '-' && s[p + 2] == '-') {
            Py_ssize_t q = p + 3;
            if (q < n && s[q] == '>') { m.kind = M_SKIP; m.end = q + 1; return m; }
            if (q + 1 < n && s[q] == '-' && s[q + 1] == '>') { m.kind = M_SKIP; m.end = q + 2; return m; }
            Py_ssize_t e = comment_end(s, q, n);
            if (e >= 0) { m.kind = M_SKIP; m.end = e; return m; }
            m.kind = M_STOP_COMMENT;
            return m;
        }
        Py_ssize_t g = find_gt(s, p + 1, n);
        if (g < 0) { m.kind = M_STOP_TAG; return m; }
        m.kind = M_SKIP; m.end = g + 1;
        return m;
    }
    if (c == '?') {
        Py_ssize_t g = find_gt(s, p + 1, n);
        if (g < 0) { m.kind = M_STOP_TAG; return m; }
        m.kind = M_SKIP; m.end = g + 1;
        return m;
    }
    return m; /* M_TEXT: "<" is text */
}

/* Start of the last `chars` characters of s[from:n]. */
static Py_ssize_t last_chars(const unsigned char *s, Py_ssize_t from, Py_ssize_t n, int chars) {
    Py_ssize_t i = n;
    while (i > from && chars > 0) {
        i--;
        while (i > from && (s[i] & 0xC0) == 0x80) i--;
        chars--;
    }
    return i;
}

/* Inside a raw-text element (rules.html._RAW_END): where data resumes, or -1 and the carry. */
static Py_ssize_t raw_end(Feed *f, const unsigned char *s, Py_ssize_t pos, Py_ssize_t n, int final) {
    const char *name = f->s->raw_names[f->state - ST_RAW];
    int nlen = f->s->raw_len[f->state - ST_RAW];
    Py_ssize_t i = pos;
    while (i < n) {
        const unsigned char *lt = memchr(s + i, '<', (size_t)(n - i));
        if (!lt) break;
        Py_ssize_t at = lt - s;
        i = at + 1;
        if (at + 1 >= n || s[at + 1] != '/') continue;
        Py_ssize_t after = at + 2 + nlen;
        if (after > n || !name_is(s + at + 2, nlen, name, nlen)) continue;
        if (after == n) { f->carry_from = final ? n : at; return -1; }
        unsigned char c = s[after];
        if (!is_ws(c) && c != '/' && c != '>') continue;
        Py_ssize_t g = find_gt(s, after, n);
        if (g >= 0) { f->state = ST_DATA; return g + 1; }
        if (c != '>') {
            Py_ssize_t chars = 0;
            for (Py_ssize_t k = after + 1; k < n; k++) chars += (s[k] & 0xC0) != 0x80;
            if (chars <= 1024) { f->carry_from = final ? n : at; return -1; }
        }
    }
    f->carry_from = final ? n : last_chars(s, pos, n, nlen + 3);
    return -1;
}

/* "&#?[0-9A-Za-z]*" to the end of s[from:n]: where it starts, or -1. */
static Py_ssize_t entity_tail(const unsigned char *s, Py_ssize_t from, Py_ssize_t n) {
    Py_ssize_t i = n;
    while (i > from && (is_alpha(s[i - 1]) || (s[i - 1] >= '0' && s[i - 1] <= '9'))) i--;
    if (i > from && s[i - 1] == '#') i--;
    if (i > from && s[i - 1] == '&' && n - (i - 1) < 64) return i - 1;
    return -1;
}

/* The markup state machine over in[0:n]; sets f->carry_from (n: nothing carried). */
static int tokenize(Feed *f, const unsigned char *s, Py_ssize_t n, int final) {
    Py_ssize_t pos = 0;
    f->carry_from = n;
    while (pos < n && !f->bail && !f->invalid) {
        if (f->state == ST_COMMENT) {
            Py_ssize_t e = comment_end(s, pos, n);
            check_range(f, s, pos, e < 0 ? n : e);
            if (e < 0) { f->carry_from = final ? n : last_chars(s, pos, n, 3); return 0; }
            f->state = ST_DATA;
            pos = e;
            continue;
        }
        if (f->state >= ST_RAW) {
            Py_ssize_t e = raw_end(f, s, pos, n, final);
            check_range(f, s, pos, e < 0 ? n : e);
            if (e < 0) return 0;
            pos = e;
            continue;
        }
        Py_ssize_t q = pos, lt;
        Markup m;
        for (;;) { /* text up to markup, a '<' that is text, or a reference */
            Py_ssize_t k = emit_until(f, s + q, n - q, 1);
            if (k < 0) return -1;
            if (f->invalid || f->bail || q + k >= n) return 0;
            k += q;
            if (s[k] == '<') { /* what emit_until leaves here: stops and raw-text starts */
                m = markup_at(f->s, s, k, n);
                lt = k;
                break;
            }
            /* '&': the rest of the text span is decoded by html.unescape */
            for (q = k + 1;; q = lt + 1) {
                const unsigned char *hit = memchr(s + q, '<', (size_t)(n - q));
                if (!hit) { lt = -1; break; }
                lt = hit - s;
                m = markup_at(f->s, s, lt, n);
                if (m.kind != M_TEXT) break;
            }
            Py_ssize_t end = lt < 0 ? n : lt;
            if (lt < 0 && !final) { /* an unfinished reference waits for the next feed */
                Py_ssize_t t = entity_tail(s, k, n);
                if (t >= 0) { end = t; f->carry_from = t; }
            }
            if (emit_text(f, s + k, end - k) < 0) return -1;
            if (lt < 0) return 0;
            break;
        }
        check_range(f, s, lt, m.kind == M_TAG || m.kind == M_SKIP || m.kind == M_STOP_RAW ? m.end : n);
        switch (m.kind) {
        case M_TAG:
            if (m.block && run_break(f) < 0) return -1;
            pos = m.end;
            break;
        case M_SKIP:
            pos = m.end;
            break;
        case M_STOP_RAW:
            f->state = ST_RAW + m.raw;
            pos = m.end;
            break;
        case M_STOP_COMMENT:
            if (n - lt < 6 && !final) { f->carry_from = lt; return 0; }
            f->state = ST_COMMENT;
            pos = lt + 4;
            break;
        case M_STOP_END:
            if (final) return emit_utf8(f, (const unsigned char *)"<", 1);
            f->carry_from = lt;
            return 0;
        default: /* M_STOP_TAG */
            if (final || n - lt > f->s->max_tag) { f->bail = 1; return 0; }
            f->carry_from = lt;
            f->carry_is_tag = 1;
            return 0;
        }
    }
    return 0;
}

/* ---- the type ---------------------------------------------------------------------- */

/* Whether the normaliser holds text back at the end of this feed (Normalizer._split_point). */
static inline int holds(Feed *f, int final) {
    return !final && f->ni_out >= 0 && f->trail_ign < HOLD_MAX && held_noninert(f);
}

static void commit(Scanner *s, Feed *f, int final) {
    s->state = f->state;
    s->in_run = f->in_run;
    Py_ssize_t out_end = f->out->len;
    s->held_in_len = s->held_out_len = s->held_ign = 0;
    if (holds(f, final)) {
        if (f->held_lazy) materialize(f);
        s->held_out_len = (int)(f->out->len - f->ni_out);
        memcpy(s->held_out, f->out->p + f->ni_out, (size_t)s->held_out_len);
        memcpy(s->held_in, f->held_in, (size_t)f->held_in_len);
        s->held_in_len = f->held_in_len;
        s->held_ign = f->trail_ign;
        out_end = f->ni_out;
        for (int i = 0; i < s->held_out_len; i++)
            f->chars -= ((unsigned char)s->held_out[i] & 0xC0) != 0x80;
    }
    f->out->len = out_end;
    s->chars = f->chars;
}

static PyObject *scanner_feed(Scanner *s, PyObject *args) {
    Py_buffer data;
    int final = 0;
    if (!PyArg_ParseTuple(args, "y*|p", &data, &final)) return NULL;
    const unsigned char *d = data.buf;
    Py_ssize_t dn = data.len;
    PyObject *result = NULL;
    Buf out = {0}; /* this feed's output: a bytes object written in place */

    /* An unfinished tag cannot end without ">": append, do not re-scan. */
    if (s->carry_is_tag && !final && !memchr(d, '>', (size_t)dn)) {
        s->in.len = 0;
        if (buf_put(&s->in, s->pending, s->pending_len) < 0 || buf_put(&s->in, (const char *)d, dn) < 0)
            goto done;
        int inc, bad;
        Py_ssize_t ok = utf8_check((const unsigned char *)s->in.p, s->in.len, &inc, &bad);
        if (bad) { result = PyLong_FromLong(-1); goto done; }
        if (memchr(s->in.p, 0, (size_t)ok) || memchr(s->in.p, 1, (size_t)ok)
                || s->carry.len + ok > s->max_tag) { result = Py_NewRef(Py_None); goto done; }
        if (buf_put(&s->carry, s->in.p, ok) < 0) goto done;
        memcpy(s->pending, s->in.p + ok, (size_t)inc);
        s->pending_len = inc;
        s->chars = 0;
        result = PyBytes_FromStringAndSize("", 0);
        goto done;
    }

    const unsigned char *in = d;
    Py_ssize_t n = dn;
    if (s->carry.len || s->pending_len) {
        s->in.len = 0;
        if (buf_put(&s->in, s->carry.p, s->carry.len) < 0 || buf_put(&s->in, s->pending, s->pending_len) < 0
                || buf_put(&s->in, (const char *)d, dn) < 0)
            goto done;
        in = (const unsigned char *)s->in.p;
        n = s->in.len;
    }
    int inc, bad;
    Py_ssize_t ok = whole_chars(in, n, &inc, &bad);
    if (bad || (final && inc)) { result = PyLong_FromLong(-1); goto done; }

    Feed f;
    memset(&f, 0, sizeof f);
    f.s = s;
    f.out = &out;
    f.state = s->state;
    f.in_run = s->in_run;
    f.ni_out = -1;
    /* the output is rarely longer than the input: one allocation, and the result itself */
    if (buf_bytes(&out, ok + s->held_out_len + 64) < 0) goto done;
    if (s->held_in_len) { /* the text held back last time comes first */
        f.ni_out = 0;
        f.ni_hold = 1;
        f.trail_ign = s->held_ign;
        memcpy(f.held_in, s->held_in, (size_t)s->held_in_len);
        f.held_in_len = s->held_in_len;
        f.in_run = 1;
        if (buf_put(&out, s->held_out, s->held_out_len) < 0) goto done;
        for (int i = 0; i < s->held_out_len; i++) f.chars += ((unsigned char)s->held_out[i] & 0xC0) != 0x80;
    }
    if (tokenize(&f, in, ok, final) < 0) goto done;
    if (f.invalid) { result = PyLong_FromLong(-1); goto done; }
    if (holds(&f, final) && out.len - f.ni_out > (Py_ssize_t)sizeof(s->held_out)) f.bail = 1;
    if (f.bail) { result = Py_NewRef(Py_None); goto done; }
    /* carry = in[carry_from:ok], copied before anything is committed (in may be s->in) */
    Buf carry = {0};
    if (buf_put(&carry, (const char *)in + f.carry_from, ok - f.carry_from) < 0) goto done;
    char pend[4];
    memcpy(pend, in + ok, (size_t)inc);
    commit(s, &f, final);
    buf_free(&s->carry);
    s->carry = carry;
    s->carry_is_tag = f.carry_is_tag;
    memcpy(s->pending, pend, (size_t)inc);
    s->pending_len = inc;
    result = buf_take_bytes(&out);
done:
    buf_free(&out);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *scanner_state(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    PyObject *state;
    if (s->state == ST_DATA) state = PyUnicode_FromString("data");
    else if (s->state == ST_COMMENT) state = PyUnicode_FromString("comment");
    else state = PyUnicode_FromString(s->raw_names[s->state - ST_RAW]);
    if (!state) return NULL;
    return Py_BuildValue("(y#iNiy#y#)", s->carry.p ? s->carry.p : "", s->carry.len, s->carry_is_tag,
                         state, s->in_run, s->held_in, (Py_ssize_t)s->held_in_len,
                         s->pending, (Py_ssize_t)s->pending_len);
}

static PyTypeObject ScannerType;

/* A new scanner (empty state) sharing this one's tables: building them is per process. */
static PyObject *scanner_fresh(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    if (!s->top) { PyErr_SetString(PyExc_RuntimeError, "scanner not initialised"); return NULL; }
    Scanner *t = (Scanner *)ScannerType.tp_alloc(&ScannerType, 0);
    if (!t) return NULL;
    t->top_obj = Py_NewRef(s->top_obj);
    t->blocks_obj = Py_NewRef(s->blocks_obj);
    t->repl_obj = Py_NewRef(s->repl_obj);
    t->unescape = Py_NewRef(s->unescape);
    t->plain_obj = Py_NewRef(s->plain_obj);
    t->plain = s->plain;
    t->plain3 = s->plain3;
    memcpy(t->ascii_plain, s->ascii_plain, sizeof s->ascii_plain);
    memcpy(t->ascii_run, s->ascii_run, sizeof s->ascii_run);
    t->top = s->top;
    t->blocks = s->blocks;
    t->repl = s->repl;
    t->nblocks = s->nblocks;
    t->repl_len = s->repl_len;
    t->max_tag = s->max_tag;
    memcpy(t->raw_names, s->raw_names, sizeof s->raw_names);
    memcpy(t->raw_len, s->raw_len, sizeof s->raw_len);
    t->nraw = s->nraw;
    memcpy(t->block_names, s->block_names, sizeof s->block_names);
    memcpy(t->block_len, s->block_len, sizeof s->block_len);
    t->nblock = s->nblock;
    memcpy(t->block_first, s->block_first, sizeof s->block_first);
    memcpy(t->block_word, s->block_word, sizeof s->block_word);
    memcpy(t->raw_word, s->raw_word, sizeof s->raw_word);
    return (PyObject *)t;
}

static PyObject *scanner_take_pending(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    PyObject *b = PyBytes_FromStringAndSize(s->pending, s->pending_len);
    if (b) s->pending_len = 0;
    return b;
}

static PyObject *scanner_chars(Scanner *s, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(s->chars);
}

static int copy_names(PyObject *seq, char names[][16], int *lens, int max, int *count) {
    PyObject *fast = PySequence_Fast(seq, "names must be a sequence");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > max) { Py_DECREF(fast); PyErr_SetString(PyExc_ValueError, "too many names"); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *u = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(fast, i), &len);
        if (!u || len >= 16 || len == 0) {
            Py_DECREF(fast);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad name");
            return -1;
        }
        memcpy(names[i], u, (size_t)len + 1);
        lens[i] = (int)len;
    }
    *count = (int)n;
    Py_DECREF(fast);
    return 0;
}

static int scanner_init(Scanner *s, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"top", "blocks", "repl", "unescape", "block_names", "raw_names",
                             "max_tag", NULL};
    PyObject *top, *blocks, *repl, *unescape, *bnames, *rnames;
    Py_ssize_t max_tag;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SSSOOOn", kwlist, &top, &blocks, &repl, &unescape,
                                     &bnames, &rnames, &max_tag))
        return -1;
    if (PyBytes_GET_SIZE(top) != 2 * (0x110000 >> 8) || PyBytes_GET_SIZE(blocks) % (256 * 4)) {
        PyErr_SetString(PyExc_ValueError, "bad table sizes");
        return -1;
    }
    if (!PyCallable_Check(unescape)) { PyErr_SetString(PyExc_TypeError, "unescape must be callable"); return -1; }
    s->nblocks = PyBytes_GET_SIZE(blocks) / (256 * 4);
    const uint16_t *t = (const uint16_t *)PyBytes_AS_STRING(top);
    for (Py_ssize_t i = 0; i < (0x110000 >> 8); i++)
        if (t[i] >= s->nblocks) { PyErr_SetString(PyExc_ValueError, "bad block index"); return -1; }
    if (copy_names(bnames, s->block_names, s->block_len, MAX_BLOCK, &s->nblock) < 0) return -1;
    if (copy_names(rnames, s->raw_names, s->raw_len, MAX_RAW, &s->nraw) < 0) return -1;
    for (int i = 0, letter = 0; letter <= 26; letter++) {
        while (i < s->nblock && s->block_names[i][0] - 'a' < letter) i++;
        s->block_first[letter] = i;
    }
    for (int i = 0; i < s->nraw; i++) {
        if (s->raw_len[i] > 8 || (s->raw_names[i][0] != 's' && s->raw_names[i][0] != 'n')) {
            PyErr_SetString(PyExc_ValueError, "raw-text names must be 's...' or 'n...', 8 letters at most");
            return -1;
        }
        s->raw_word[i] = pack8((const unsigned char *)s->raw_names[i], s->raw_len[i],
                               (const unsigned char *)s->raw_names[i] + sizeof s->raw_names[i]);
    }
    for (int i = 0; i < s->nblock; i++)
        s->block_word[i] = s->block_len[i] <= 8
            ? pack8((const unsigned char *)s->block_names[i], s->block_len[i],
                    (const unsigned char *)s->block_names[i] + sizeof s->block_names[i]) : 0;
    for (int i = 0; i < s->nblock; i++)
        if (!(s->block_names[i][0] >= 'a' && s->block_names[i][0] <= 'z')
                || (i && strcmp(s->block_names[i - 1], s->block_names[i]) > 0)) {
            PyErr_SetString(PyExc_ValueError, "block names must be sorted, lower case");
            return -1;
        }
    Py_XSETREF(s->top_obj, Py_NewRef(top));
    Py_XSETREF(s->blocks_obj, Py_NewRef(blocks));
    Py_XSETREF(s->repl_obj, Py_NewRef(repl));
    Py_XSETREF(s->unescape, Py_NewRef(unescape));
    s->top = t;
    s->blocks = (const uint32_t *)PyBytes_AS_STRING(blocks);
    s->repl = (const unsigned char *)PyBytes_AS_STRING(repl);
    s->repl_len = PyBytes_GET_SIZE(repl);
    s->max_tag = max_tag;
    PyObject *plain = PyBytes_FromStringAndSize(NULL, 2 * 0x10000 / 8); /* plain, plain3 */
    if (!plain) return -1;
    unsigned char *bits = (unsigned char *)PyBytes_AS_STRING(plain);
    memset(bits, 0, 0x10000 / 8);
    for (uint32_t cp = 0; cp < 0x10000; cp++)
        if (((entry_of(s, cp) >> 24) & ~F_NONINERT) == 0) bits[cp >> 3] |= (unsigned char)(1u << (cp & 7));
    memcpy(bits + 0x10000 / 8, bits, 0x10000 / 8);
    unsigned char *bits3 = bits + 0x10000 / 8;
    memset(bits3, 0, 0x800 / 8);
    memset(bits3 + 0xD800 / 8, 0, 0x800 / 8);
    Py_XSETREF(s->plain_obj, plain);
    s->plain = bits;
    s->plain3 = bits3;
    if (!((bits['<' >> 3] >> ('<' & 7)) & 1) || !((bits['&' >> 3] >> ('&' & 7)) & 1)) {
        /* emit_until copies a '<' that opens nothing as text */
        PyErr_SetString(PyExc_ValueError, "'<' and '&' must normalise to themselves");
        return -1;
    }
    for (int c = 0; c < 128; c++) { /* 1: copied, 2: dropped, 0: anything else */
        unsigned flags = entry_of(s, (uint32_t)c) >> 24;
        s->ascii_plain[c] = c < 2 ? 0 : ((bits[c >> 3] >> (c & 7)) & 1) ? 1 : (flags & F_IGNORABLE) ? 2 : 0;
        s->ascii_run[c] = (c == '<' || c == '&') ? 0 : s->ascii_plain[c];
    }
    return 0;
}

static void scanner_dealloc(Scanner *s) {
    Py_XDECREF(s->top_obj);
    Py_XDECREF(s->blocks_obj);
    Py_XDECREF(s->repl_obj);
    Py_XDECREF(s->unescape);
    Py_XDECREF(s->plain_obj);
    buf_free(&s->carry);
    buf_free(&s->in);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef scanner_methods[] = {
    {"feed", (PyCFunction)scanner_feed, METH_VARARGS,
     "feed(data, final=False) -> bytes (normalised UTF-8 runs, NUL between runs), None when "
     "this input needs the Python path (state unchanged), or -1 for invalid UTF-8."},
    {"fresh", (PyCFunction)scanner_fresh, METH_NOARGS,
     "fresh() -> a new Scanner with empty state and the same tables."},
    {"take_pending", (PyCFunction)scanner_take_pending, METH_NOARGS,
     "take_pending() -> the incomplete UTF-8 character held from the last input (cleared)."},
    {"state", (PyCFunction)scanner_state, METH_NOARGS,
     "state() -> (carry, carry_is_tag, html_state, in_run, held, pending) for the Python path."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef scanner_getset[] = {
    {"chars", (getter)scanner_chars, NULL, "characters in the last feed's output", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rules._htmlscan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One HTML body: UTF-8 in, normalised text runs out (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)scanner_init,
    .tp_dealloc = (destructor)scanner_dealloc,
    .tp_methods = scanner_methods,
    .tp_getset = scanner_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "rules._htmlscan", "Compiled HTML text runs + normalisation.", -1, NULL,
};

PyMODINIT_FUNC PyInit__htmlscan(void) {
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0
            || PyModule_AddIntConstant(m, "F_CHANGES", F_CHANGES) < 0
            || PyModule_AddIntConstant(m, "F_COMPLEX", F_COMPLEX) < 0
            || PyModule_AddIntConstant(m, "F_NONINERT", F_NONINERT) < 0
            || PyModule_AddIntConstant(m, "F_IGNORABLE", F_IGNORABLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
