/*
 * The reader of memcached's reply to `get`, compiled: `protocol.parse_values` when this
 * module is built (see `protocol`), with exactly the meaning of the Python reader.
 *
 * A get_many reply is mostly plain lines `VALUE <key> <flags> <bytes>\r\n` and data blocks.
 * Those, and the final `END\r\n`, are read here. Any other line (a `cas` field that is not
 * digits, a refusal, garbage, a line not complete yet, a number too long for 64 bits) is
 * handed to the Python reader's own `_other_values_line`, so that what such a line means,
 * and the message of the error it raises, are written once, in Python.
 *
 * Every read is bounded by the buffer's length: `position <= size` holds throughout, and no
 * byte at or past `size` is looked at.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* protocol.MAX_LINE_LENGTH: a reply line, CRLF excluded, is at most this long. */
#define MAX_LINE_LENGTH 8192
/* More digits than this might not fit 63 bits: the line goes to the Python reader. */
#define MAX_DIGITS 18

typedef struct {
    Py_ssize_t key_start;
    Py_ssize_t key_length;
    long long flags;
    Py_ssize_t length;
    Py_ssize_t data_start;
} ValueLine;

/* The count of ASCII digits from `at` (at most MAX_DIGITS + 1), their value in `value`. */
static Py_ssize_t
read_digits(const char *bytes, Py_ssize_t at, Py_ssize_t size, long long *value)
{
    Py_ssize_t count = 0;
    long long total = 0;
    while (at + count < size && count <= MAX_DIGITS && bytes[at + count] >= '0' &&
           bytes[at + count] <= '9') {
        total = total * 10 + (bytes[at + count] - '0');
        count++;
    }
    *value = total;
    return count;
}

/*
 * Whether `bytes[at:]` starts with a plain, complete VALUE line: the Python reader's
 * `_VALUE_LINE` (`VALUE ([^ \r\n]+) (\d+) (\d+)(?: \d+)?\r\n`) matched in at most
 * MAX_LINE_LENGTH + 2 bytes, with numbers of at most MAX_DIGITS digits.
 */
static int
read_value_line(const char *bytes, Py_ssize_t at, Py_ssize_t size, ValueLine *line)
{
    Py_ssize_t end = size;
    Py_ssize_t position, count;
    long long number;

    if (end - at > MAX_LINE_LENGTH + 2) {
        end = at + MAX_LINE_LENGTH + 2;
    }
    if (end - at < 6 || memcmp(bytes + at, "VALUE ", 6) != 0) {
        return 0;
    }
    position = at + 6;
    line->key_start = position;
    while (position < end && bytes[position] != ' ' && bytes[position] != '\r' &&
           bytes[position] != '\n') {
        position++;
    }
    line->key_length = position - line->key_start;
    if (line->key_length == 0 || position >= end || bytes[position] != ' ') {
        return 0;
    }
    position++;
    count = read_digits(bytes, position, end, &line->flags);
    if (count == 0 || count > MAX_DIGITS || position + count >= end ||
        bytes[position + count] != ' ') {
        return 0;
    }
    position += count + 1;
    count = read_digits(bytes, position, end, &number);
    if (count == 0 || count > MAX_DIGITS) {
        return 0;
    }
    line->length = (Py_ssize_t)number;
    position += count;
    if (position < end && bytes[position] == ' ') { /* the cas field */
        position++;
        count = read_digits(bytes, position, end, &number);
        if (count == 0 || count > MAX_DIGITS) {
            return 0;
        }
        position += count;
    }
    if (end - position < 2 || bytes[position] != '\r' || bytes[position + 1] != '\n') {
        return 0;
    }
    line->data_start = position + 2;
    return 1;
}

/*
 * The line at `at` read by the Python reader: `_other_values_line(buffer, at, found)`.
 * Returns 1 with a new reference to the key and flags of a VALUE line and its length and
 * data offset; 0 with `*reply` set to what parse_values returns (the reply, a refusal, or
 * None); -1 with an exception set.
 */
static int
read_other_line(PyObject *other_line, PyObject *buffer, Py_ssize_t at, PyObject *found,
                PyObject **key, PyObject **flags, Py_ssize_t *length, Py_ssize_t *data_start,
                PyObject **reply)
{
    PyObject *outcome, *header, *length_object;
    int overflow;
    long long length_value;

    outcome = PyObject_CallFunction(other_line, "OnO", buffer, at, found);
    if (outcome == NULL) {
        return -1;
    }
    if (outcome == Py_None || !PyTuple_CheckExact(outcome) || PyTuple_GET_SIZE(outcome) != 2 ||
        !PyTuple_CheckExact(PyTuple_GET_ITEM(outcome, 0))) {
        *reply = outcome;
        return 0;
    }
    header = PyTuple_GET_ITEM(outcome, 0);
    if (PyTuple_GET_SIZE(header) != 3) {
        PyErr_SetString(PyExc_SystemError, "_other_values_line returned a bad VALUE line");
        Py_DECREF(outcome);
        return -1;
    }
    length_object = PyTuple_GET_ITEM(header, 2);
    length_value = PyLong_AsLongLongAndOverflow(length_object, &overflow);
    *data_start = PyLong_AsSsize_t(PyTuple_GET_ITEM(outcome, 1));
    if ((length_value == -1 && PyErr_Occurred()) || (*data_start == -1 && PyErr_Occurred())) {
        Py_DECREF(outcome);
        return -1;
    }
    /* A length past any buffer: the reply is incomplete, as the Python reader says. */
    *length = overflow || length_value > PY_SSIZE_T_MAX / 2 ? PY_SSIZE_T_MAX / 2
                                                             : (Py_ssize_t)length_value;
    *key = Py_NewRef(PyTuple_GET_ITEM(header, 0));
    *flags = Py_NewRef(PyTuple_GET_ITEM(header, 1));
    Py_DECREF(outcome);
    return 1;
}

static PyObject *
parse_reply(PyObject *other_line, PyObject *malformed, PyObject *buffer, const char *bytes,
            Py_ssize_t size, Py_ssize_t start)
{
    PyObject *found = PyDict_New();
    PyObject *key = NULL, *flags = NULL, *entry = NULL, *data, *reply;
    Py_ssize_t position = start, data_end;
    ValueLine line;

    if (found == NULL) {
        return NULL;
    }
    for (;;) {
        if (read_value_line(bytes, position, size, &line)) {
            key = PyBytes_FromStringAndSize(bytes + line.key_start, line.key_length);
            flags = PyLong_FromLongLong(line.flags);
            if (key == NULL || flags == NULL) {
                goto error;
            }
            position = line.data_start;
        }
        else if (size - position >= 5 && memcmp(bytes + position, "END\r\n", 5) == 0) {
            reply = Py_BuildValue("(On)", found, position + 5);
            Py_DECREF(found);
            return reply;
        }
        else {
            reply = NULL;
            switch (read_other_line(other_line, buffer, position, found, &key, &flags,
                                    &line.length, &position, &reply)) {
            case -1:
                goto error;
            case 0:
                Py_DECREF(found);
                return reply;
            }
        }
        if (position > size || line.length > size - position - 2) {
            Py_DECREF(key);
            Py_DECREF(flags);
            Py_DECREF(found);
            Py_RETURN_NONE; /* The data block is not all here yet. */
        }
        data_end = position + line.length;
        if (bytes[data_end] != '\r' || bytes[data_end + 1] != '\n') {
            PyErr_Format(malformed, "value of %R is not %zd bytes long", key, line.length);
            goto error;
        }
        data = PyBytes_FromStringAndSize(bytes + position, line.length);
        if (data == NULL) {
            goto error;
        }
        entry = PyTuple_Pack(2, flags, data);
        Py_DECREF(data);
        if (entry == NULL || PyDict_SetItem(found, key, entry) < 0) {
            goto error;
        }
        Py_CLEAR(entry);
        Py_CLEAR(key);
        Py_CLEAR(flags);
        position = data_end + 2;
    }
error:
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_XDECREF(flags);
    Py_DECREF(found);
    return NULL;
}

PyDoc_STRVAR(parse_values_doc,
             "parse_values(other_line, malformed, buffer, start)\n--\n\n"
             "protocol.parse_values, with the Python reader's _other_values_line and\n"
             "MalformedReply given first (protocol binds them).");

static PyObject *
parse_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start;
    PyObject *reply;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "parse_values takes 4 arguments, got %zd", nargs);
        return NULL;
    }
    start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "start must not be negative, got %zd", start);
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (start > view.len) {
        start = view.len; /* Nothing to read: incomplete, as the Python reader says. */
    }
    reply = parse_reply(args[0], args[1], args[2], view.buf, view.len, start);
    PyBuffer_Release(&view);
    return reply;
}

static PyMethodDef speedups_methods[] = {
    {"parse_values", (PyCFunction)(void (*)(void))parse_values, METH_FASTCALL,
     parse_values_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "django_elasticache._speedups",
    .m_doc = "Compiled versions of django_elasticache's hottest loops (optional).",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
