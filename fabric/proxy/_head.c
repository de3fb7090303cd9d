/* The HTTP listener's fast path: one whole, plain HTTP/1.1 message read in one call.
 *
 * llhttp (through httptools) reads every message the listener is not sure
 * of; its callbacks into Python (one per header, and what http1.Reader does
 * in them) cost more than the parse. This reads only the messages that
 * carry a proxy's every request in the common case - a keep-alive HTTP/1.1
 * request with no body or a Content-Length body, an answer with a
 * Content-Length - from a grammar stricter than llhttp's, and declines
 * (returns None) for anything else: llhttp reads that message, and says
 * whether it is malformed. So this never refuses a message, and never takes
 * one that llhttp would refuse or read otherwise (tests/unit/test_http1.py
 * checks both readers against each other on generated messages).
 *
 * Declined: a head not whole in `data`, or over `max_head` bytes; a body not
 * whole in `data`; a method other than the eight common ones; a target other
 * than an origin-form path and query of plain characters; a version other
 * than HTTP/1.1; obsolete line folding, bare CR or LF, a header name or value
 * character outside RFC 9110's grammar; Transfer-Encoding, Upgrade,
 * Proxy-Connection; a Connection other than "keep-alive"; a Content-Length
 * other than up to 15 digits, or more than one; a request without exactly
 * one Host; an answer without a Content-Length, or with a status other than
 * 200-599 (204 and 304 too: they have no body whatever their headers say).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define TOKEN 1  /* tchar (RFC 9110, 5.6.2): a header name, a method */
#define VALUE 2  /* field-vchar, SP, HTAB (RFC 9110, 5.5): a header value, a reason phrase */
#define PATH 4   /* pchar and "/" "?" (RFC 3986): an origin-form target, percent-encoded or not */

static unsigned char classes[256];

static void
init_classes(void)
{
    const char *token_extra = "!#$%&'*+-.^_`|~";
    const char *path_extra = "-._~!$&'()*+,;=:@/?%";
    for (int c = 0; c < 256; c++) {
        unsigned char k = 0;
        int alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        if (alnum || (c && strchr(token_extra, c)))
            k |= TOKEN;
        if ((c >= 0x21 && c <= 0x7e) || c >= 0x80 || c == ' ' || c == '\t')
            k |= VALUE;
        if (alnum || (c && strchr(path_extra, c)))
            k |= PATH;
        classes[c] = k;
    }
}

/* The headers a proxy does not pass on as they came: hop-by-hop ones (RFC 9110, 7.6.1) and the
 * forwarding ones it extends. http.py's HOP_BY_HOP | FORWARDING, which a test checks against SPECIAL. */
static const char *const special_names[] = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "x-forwarded-for", "x-forwarded-proto", "forwarded", "via",
};
#define SPECIALS (sizeof(special_names) / sizeof(special_names[0]))
static size_t special_lengths[SPECIALS];  /* (measured once, at import: not per header) */

static const char *const method_names[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"};
#define METHODS (sizeof(method_names) / sizeof(method_names[0]))
static PyObject *methods[METHODS];  /* as bytes, made once: every request's Head shares them */

static int
same_lower(const unsigned char *p, Py_ssize_t n, const char *lower)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

static int
is_special(const unsigned char *name, Py_ssize_t n)
{
    for (size_t i = 0; i < SPECIALS; i++) {
        if ((size_t)n == special_lengths[i] && same_lower(name, n, special_names[i]))
            return 1;
    }
    return 0;
}

/* The headers from `p` to the blank line that ends them, appended to `headers` as (name, value);
 * `*plain`: none is special but Connection (keep-alive, the one value taken). Returns the offset
 * just past the blank line, 0 to decline, -1 with an exception set. */
static Py_ssize_t
read_headers(const unsigned char *p, Py_ssize_t pos, Py_ssize_t limit, int request, PyObject *headers,
             long long *length, int *plain)
{
    int hosts = 0;
    *length = -1;
    *plain = 1;
    for (;;) {
        if (pos + 1 >= limit)
            return 0;
        if (p[pos] == '\r')
            return p[pos + 1] == '\n' && (!request || hosts == 1) ? pos + 2 : 0;
        Py_ssize_t name = pos;
        while (pos < limit && (classes[p[pos]] & TOKEN))
            pos++;
        Py_ssize_t name_len = pos - name;
        if (name_len == 0 || pos >= limit || p[pos] != ':')
            return 0;
        pos++;
        while (pos < limit && (p[pos] == ' ' || p[pos] == '\t'))
            pos++;
        Py_ssize_t value = pos;
        while (pos < limit && (classes[p[pos]] & VALUE))
            pos++;
        if (pos + 1 >= limit || p[pos] != '\r' || p[pos + 1] != '\n')
            return 0;
        Py_ssize_t value_len = pos - value;  /* trailing whitespace kept, as llhttp keeps it */
        pos += 2;
        const unsigned char *n = p + name;
        switch (name_len) {
        case 4:
            hosts += same_lower(n, 4, "host");
            break;
        case 7:
            if (same_lower(n, 7, "upgrade"))
                return 0;
            break;
        case 10:
            if (same_lower(n, 10, "connection") && !(value_len == 10 && same_lower(p + value, 10, "keep-alive")))
                return 0;
            break;
        case 14:
            if (same_lower(n, 14, "content-length")) {
                if (*length >= 0 || value_len == 0 || value_len > 15)
                    return 0;
                long long v = 0;
                for (Py_ssize_t i = 0; i < value_len; i++) {
                    unsigned char c = p[value + i];
                    if (c < '0' || c > '9')
                        return 0;
                    v = v * 10 + (c - '0');
                }
                *length = v;
            }
            break;
        case 16:
            if (same_lower(n, 16, "proxy-connection"))
                return 0;
            break;
        case 17:
            if (same_lower(n, 17, "transfer-encoding"))
                return 0;
            break;
        }
        if (*plain && is_special(n, name_len) && !(name_len == 10 && same_lower(n, 10, "connection")))
            *plain = 0;
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL)
            return -1;
        PyObject *name_bytes = PyBytes_FromStringAndSize((const char *)n, name_len);
        PyTuple_SET_ITEM(pair, 0, name_bytes);
        PyObject *value_bytes = PyBytes_FromStringAndSize((const char *)p + value, value_len);
        PyTuple_SET_ITEM(pair, 1, value_bytes);
        int failed = name_bytes == NULL || value_bytes == NULL || PyList_Append(headers, pair);
        Py_DECREF(pair);
        if (failed)
            return -1;
    }
}

/* The header lines as a proxy passes them on, b"name: value\r\n" each, Connection left out. */
static PyObject *
plain_lines(PyObject *headers)
{
    Py_ssize_t count = PyList_GET_SIZE(headers), size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        size += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) + PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) + 4;
    }
    PyObject *lines = PyBytes_FromStringAndSize(NULL, size);
    if (lines == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(lines);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t n = PyBytes_GET_SIZE(name), v = PyBytes_GET_SIZE(value);
        if (n == 10 && same_lower((const unsigned char *)PyBytes_AS_STRING(name), 10, "connection"))
            continue;
        memcpy(out, PyBytes_AS_STRING(name), n);
        memcpy(out + n, ": ", 2);
        memcpy(out + n + 2, PyBytes_AS_STRING(value), v);
        memcpy(out + n + 2 + v, "\r\n", 2);
        out += n + v + 4;
    }
    if (_PyBytes_Resize(&lines, out - PyBytes_AS_STRING(lines)) < 0)
        return NULL;
    return lines;
}

PyDoc_STRVAR(parse_doc,
"parse(data, start, request, max_head)\n--\n\n"
"The plain HTTP/1.1 message that begins at data[start], if it is whole in data:\n"
"(end of its head, Content-Length or -1, method or status, target or reason, headers,\n"
"lines) - its body is data[end of head:end of head + Content-Length]; lines: the\n"
"header lines as a proxy passes them on (b\"name: value\\r\\n\" each, Connection left\n"
"out) when none is in SPECIAL but Connection, else None. None when this path\n"
"declines the message (see the module's source): llhttp reads it then.");

static PyObject *
parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, max_head;
    int request;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "parse() takes data, start, request, max_head");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    max_head = PyLong_AsSsize_t(args[3]);
    request = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || request < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL, *first = NULL, *second = NULL, *headers = NULL, *lines = NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t size = view.len;
    if (start < 0 || start > size || max_head < 0)
        goto decline;
    Py_ssize_t limit = size - start > max_head ? start + max_head : size;
    Py_ssize_t pos = start;
    if (request) {
        size_t m;
        for (m = 0; m < METHODS; m++) {
            Py_ssize_t n = PyBytes_GET_SIZE(methods[m]);
            if (limit - pos > n && memcmp(p + pos, method_names[m], n) == 0 && p[pos + n] == ' ')
                break;
        }
        if (m == METHODS)
            goto decline;
        pos += PyBytes_GET_SIZE(methods[m]) + 1;
        Py_ssize_t target = pos;
        if (pos >= limit || p[pos] != '/')
            goto decline;
        while (pos < limit && (classes[p[pos]] & PATH))
            pos++;
        if (limit - pos < 11 || memcmp(p + pos, " HTTP/1.1\r\n", 11) != 0)
            goto decline;
        first = methods[m];
        Py_INCREF(first);
        second = PyBytes_FromStringAndSize((const char *)p + target, pos - target);
        pos += 11;
    } else {
        if (limit - pos < 13 || memcmp(p + pos, "HTTP/1.1 ", 9) != 0)
            goto decline;
        pos += 9;
        int status = 0;
        for (int i = 0; i < 3; i++, pos++) {
            if (p[pos] < '0' || p[pos] > '9')
                goto decline;
            status = status * 10 + (p[pos] - '0');
        }
        if (status < 200 || status > 599 || status == 204 || status == 304 || p[pos] != ' ')
            goto decline;
        Py_ssize_t reason = ++pos;
        while (pos < limit && (classes[p[pos]] & VALUE))
            pos++;
        if (limit - pos < 2 || p[pos] != '\r' || p[pos + 1] != '\n')
            goto decline;
        first = PyLong_FromLong(status);
        second = PyBytes_FromStringAndSize((const char *)p + reason, pos - reason);
        pos += 2;
    }
    if (first == NULL || second == NULL)
        goto done;
    headers = PyList_New(0);
    if (headers == NULL)
        goto done;
    long long length;
    int plain;
    Py_ssize_t end = read_headers(p, pos, limit, request, headers, &length, &plain);
    if (end < 0)
        goto done;
    if (end == 0 || (!request && length < 0) || (length > 0 && length > size - end))
        goto decline;
    if (plain) {
        if ((lines = plain_lines(headers)) == NULL)
            goto done;
    } else {
        lines = Py_None;
        Py_INCREF(lines);
    }
    result = Py_BuildValue("(nLOOOO)", end, length, first, second, headers, lines);
    goto done;
decline:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(first);
    Py_XDECREF(second);
    Py_XDECREF(headers);
    Py_XDECREF(lines);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef functions[] = {
    {"parse", (PyCFunction)(void (*)(void))parse, METH_FASTCALL, parse_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fabric.proxy._head",
    "The HTTP listener's fast path for plain HTTP/1.1 messages (see _head.c).", -1, functions,
};

PyMODINIT_FUNC
PyInit__head(void)
{
    init_classes();
    for (size_t i = 0; i < SPECIALS; i++)
        special_lengths[i] = strlen(special_names[i]);
    for (size_t m = 0; m < METHODS; m++) {
        if (methods[m] == NULL && (methods[m] = PyBytes_FromString(method_names[m])) == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *special = PyTuple_New(SPECIALS);
    if (special == NULL)
        goto fail;
    for (size_t i = 0; i < SPECIALS; i++) {
        PyObject *name = PyBytes_FromString(special_names[i]);
        if (name == NULL) {
            Py_DECREF(special);
            goto fail;
        }
        PyTuple_SET_ITEM(special, i, name);
    }
    int added = PyModule_AddObjectRef(m, "SPECIAL", special);
    Py_DECREF(special);
    if (added == 0)
        return m;
fail:
    Py_DECREF(m);
    return NULL;
}
