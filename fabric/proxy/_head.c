/* The HTTP listener's fast path: one whole, plain HTTP/1.1 message read in one call.
 *
 * llhttp (through httptools) reads every message the listener is not sure
 * of; its callbacks into Python (one per header, and what http1.Reader does
 * in them) cost more than the parse. This reads only the plain messages
 * (fabric/proxy/plain.py says which, and declines the others as this does:
 * parse_python there is this in Python) from a grammar stricter than
 * llhttp's, and declines (returns None) anything else: llhttp reads that
 * message, and says whether it is malformed. So this never refuses a
 * message, and never takes one that llhttp would refuse or read otherwise
 * (tests/unit/test_http1.py checks the readers against each other on
 * generated messages).
 *
 * The methods taken and the headers read specially come from plain.py, at
 * import (init): they are defined there once. Host, Connection and
 * Content-Length are read here, by name: their values matter.
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

/* From plain.py (init): the methods taken, as bytes shared by every request's Head, and the headers
 * read specially, lower-case, each with what it does. */
#define MAX_METHODS 16
#define MAX_NAMES 32
#define MAX_NAME 63  /* bytes: a name's length is a bit of `name_lengths` */
#define SPECIAL 1    /* a proxy does not pass it on as it came: no `lines` */
#define DECLINED 2   /* llhttp reads the message */
static PyObject *methods[MAX_METHODS];
static Py_ssize_t method_count;
static struct {
    char name[MAX_NAME + 1];
    Py_ssize_t length;
    int flags;
} names[MAX_NAMES];
static Py_ssize_t name_count;
static unsigned long long name_lengths;  /* bit n: a name of n bytes is in `names` (most headers are not) */
static int ready;  /* init has been called */

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

/* What `names` says of a header name: SPECIAL, DECLINED, both or neither. */
static int
name_flags(const unsigned char *name, Py_ssize_t n)
{
    if (n > MAX_NAME || !((name_lengths >> n) & 1))
        return 0;
    for (Py_ssize_t i = 0; i < name_count; i++) {
        if (n == names[i].length && same_lower(name, n, names[i].name))
            return names[i].flags;
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
        int connection = 0;
        switch (name_len) {
        case 4:
            hosts += same_lower(n, 4, "host");
            break;
        case 10:
            connection = same_lower(n, 10, "connection");
            if (connection && !(value_len == 10 && same_lower(p + value, 10, "keep-alive")))
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
        }
        int flags = name_flags(n, name_len);
        if (flags & DECLINED)
            return 0;
        if ((flags & SPECIAL) && !connection)
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
"out) when none is special but Connection, else None. None when this path\n"
"declines the message (see fabric/proxy/plain.py): llhttp reads it then.");

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
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "parse() before init()");
        return NULL;
    }
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
        Py_ssize_t m;
        for (m = 0; m < method_count; m++) {
            Py_ssize_t n = PyBytes_GET_SIZE(methods[m]);
            if (limit - pos > n && memcmp(p + pos, PyBytes_AS_STRING(methods[m]), n) == 0 && p[pos + n] == ' ')
                break;
        }
        if (m == method_count)
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

/* The headers of `names` (an iterable of bytes) added to `names` with `flag`: 0, or -1 with an exception set. */
static int
add_names(PyObject *iterable, int flag)
{
    PyObject *iterator = PyObject_GetIter(iterable), *name;
    if (iterator == NULL)
        return -1;
    while ((name = PyIter_Next(iterator)) != NULL) {
        Py_ssize_t n = PyBytes_Check(name) ? PyBytes_GET_SIZE(name) : 0;
        if (n < 1 || n > MAX_NAME) {
            PyErr_Format(PyExc_ValueError, "a header name is 1 to %d bytes, not %R", MAX_NAME, name);
            goto fail;
        }
        char lower[MAX_NAME + 1];
        for (Py_ssize_t i = 0; i <= n; i++)
            lower[i] = (char)Py_TOLOWER(PyBytes_AS_STRING(name)[i]);
        Py_ssize_t i;
        for (i = 0; i < name_count; i++) {
            if (names[i].length == n && memcmp(names[i].name, lower, n) == 0)
                break;
        }
        if (i == MAX_NAMES) {
            PyErr_Format(PyExc_ValueError, "more than %d header names", MAX_NAMES);
            goto fail;
        }
        if (i == name_count) {
            memcpy(names[i].name, lower, n + 1);
            names[i].length = n;
            names[i].flags = 0;
            name_count++;
            name_lengths |= 1ULL << n;
        }
        names[i].flags |= flag;
        Py_DECREF(name);
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
fail:
    Py_DECREF(name);
    Py_DECREF(iterator);
    return -1;
}

PyDoc_STRVAR(init_doc,
"init(methods, special, declined)\n--\n\n"
"What parse() reads by the lists of fabric/proxy/plain.py: the methods a plain request\n"
"has (a sequence of bytes), the header names that give no lines (special) and those\n"
"that make it decline (declined), lower-case bytes. Once, at import, before parse().");

static PyObject *
init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "init() takes methods, special, declined");
        return NULL;
    }
    PyObject *given = PySequence_Fast(args[0], "init(): methods is a sequence of bytes");
    if (given == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(given);
    for (Py_ssize_t m = 0; m < count; m++) {
        PyObject *method = PySequence_Fast_GET_ITEM(given, m);
        if (!PyBytes_Check(method) || PyBytes_GET_SIZE(method) == 0 || count > MAX_METHODS) {
            PyErr_Format(PyExc_ValueError, "init(): up to %d methods, each non-empty bytes", MAX_METHODS);
            Py_DECREF(given);
            return NULL;
        }
    }
    ready = 0;
    for (Py_ssize_t m = 0; m < method_count; m++)
        Py_CLEAR(methods[m]);
    for (Py_ssize_t m = 0; m < count; m++)
        methods[m] = Py_NewRef(PySequence_Fast_GET_ITEM(given, m));
    method_count = count;
    Py_DECREF(given);
    name_count = 0;
    name_lengths = 0;
    if (add_names(args[1], SPECIAL) < 0 || add_names(args[2], DECLINED) < 0)
        return NULL;
    ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef functions[] = {
    {"init", (PyCFunction)(void (*)(void))init, METH_FASTCALL, init_doc},
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
    return PyModule_Create(&module);
}
