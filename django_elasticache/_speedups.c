/*
 * The hottest loops of get_many and of single-key calls, compiled, each with exactly the
 * meaning of its Python twin (named at each function), used where this module is not built:
 *
 * - `prefixed_keys`: Django's keys made and checked at once (`backend`);
 * - `made_key`: the same for one key of a cache (`backend`);
 * - `pooled_call`: a single-key call on a pooled client of the key's node (`routing`);
 * - `borrow`, `give_back`: a pool's own, their common case (`pool.NodePool`);
 * - `group_by_node`: keys split by the node that holds them (`routing`);
 * - `retrieval_request`: a node's `get` request and the keys it asks for (`protocol`);
 * - `parse_values`: the reader of memcached's reply to `get` (`protocol`);
 * - `decoded_values`: the values read, decoded, under the keys the caller asked for
 *   (`protocol`).
 *
 * The reader's notes:
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

/* memcached's limit on a key, in bytes. */
#define MAX_KEY_LENGTH 250

/* Whether `text` is an ASCII str of characters from '!' to '~' only. */
static int
is_plain_ascii(PyObject *text)
{
    const Py_UCS1 *characters;
    Py_ssize_t at;

    if (!PyUnicode_CheckExact(text) || !PyUnicode_IS_ASCII(text)) {
        return 0;
    }
    characters = PyUnicode_1BYTE_DATA(text);
    for (at = 0; at < PyUnicode_GET_LENGTH(text); at++) {
        if (characters[at] <= ' ' || characters[at] >= 0x7f) {
            return 0;
        }
    }
    return 1;
}

PyDoc_STRVAR(prefixed_keys_doc,
             "prefixed_keys(prefix, keys)\n--\n\n"
             "{prefix + key: key} for a list of str keys, or None unless the prefix and\n"
             "every key are ASCII and each prefix + key is 1 to 250 characters from '!'\n"
             "to '~' (a key Django's own checks accept as it is; see backend).");

static PyObject *
prefixed_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *prefix, *keys, *made, *key, *result;
    Py_ssize_t length, index;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "prefixed_keys takes 2 arguments, got %zd", nargs);
        return NULL;
    }
    prefix = args[0];
    keys = args[1];
    if (!is_plain_ascii(prefix) || !PyList_CheckExact(keys)) {
        Py_RETURN_NONE;
    }
    result = PyDict_New();
    if (result == NULL) {
        return NULL;
    }
    /* Exact str keys: hashing and comparing them runs no Python code. */
    for (index = 0; index < PyList_GET_SIZE(keys); index++) {
        key = PyList_GET_ITEM(keys, index);
        if (!is_plain_ascii(key)) {
            Py_DECREF(result);
            Py_RETURN_NONE;
        }
        length = PyUnicode_GET_LENGTH(prefix) + PyUnicode_GET_LENGTH(key);
        if (length < 1 || length > MAX_KEY_LENGTH) {
            Py_DECREF(result);
            Py_RETURN_NONE;
        }
        Py_INCREF(key); /* Held across the calls below. */
        made = PyUnicode_Concat(prefix, key);
        if (made == NULL || PyDict_SetItem(result, made, key) < 0) {
            Py_XDECREF(made);
            Py_DECREF(key);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(made);
        Py_DECREF(key);
    }
    return result;
}

PyDoc_STRVAR(made_key_doc,
             "made_key(cache, key, version)\n--\n\n"
             "f'{cache.key_prefix}:{version}:{key}' (version: cache.version if None) where\n"
             "cache._default_key_making, for a str prefix and key and an int or str\n"
             "version; None otherwise, or unless it is 1 to 250 characters from '!' to '~'\n"
             "(backend.made_key_in_python).");

static PyObject *name_default_key_making, *name_key_prefix, *name_version;

/*
 * An exact int's decimal digits (and sign) written at the end of `buffer`, as str() gives
 * them: the start of the text, or NULL if the int does not fit a long long.
 */
static const char *
int_text(PyObject *number, char *buffer, size_t size)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    unsigned long long rest;
    char *start = buffer + size;

    if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return NULL;
    }
    rest = value < 0 ? 0ULL - (unsigned long long)value : (unsigned long long)value;
    do {
        *--start = (char)('0' + rest % 10);
        rest /= 10;
    } while (rest != 0);
    if (value < 0) {
        *--start = '-';
    }
    return start;
}

/*
 * f"{prefix}:{version}:{key}" if plain (see the doc above), else None: a new reference, or
 * NULL with an error set.
 */
static PyObject *
joined_key(PyObject *prefix, PyObject *version, PyObject *key)
{
    PyObject *version_str = NULL, *made = Py_None;
    const char *version_text;
    char digits[24]; /* A long long's 19 digits and sign. */
    Py_ssize_t prefix_length, version_length, key_length;
    Py_UCS1 *out;

    /* An int version (Django's default, 1) is written out here, without a str object. */
    if (PyLong_CheckExact(version) &&
        (version_text = int_text(version, digits, sizeof(digits))) != NULL) {
        version_length = digits + sizeof(digits) - version_text;
    }
    else {
        if (PyLong_CheckExact(version)) {
            version_str = PyObject_Str(version);
        }
        else if (PyUnicode_CheckExact(version)) {
            version_str = Py_NewRef(version);
        }
        else {
            Py_RETURN_NONE;
        }
        if (version_str == NULL) {
            return NULL;
        }
        if (!is_plain_ascii(version_str)) {
            Py_DECREF(version_str);
            Py_RETURN_NONE;
        }
        version_text = (const char *)PyUnicode_1BYTE_DATA(version_str);
        version_length = PyUnicode_GET_LENGTH(version_str);
    }
    if (is_plain_ascii(prefix) && is_plain_ascii(key)) {
        prefix_length = PyUnicode_GET_LENGTH(prefix);
        key_length = PyUnicode_GET_LENGTH(key);
        if (prefix_length + version_length + key_length + 2 <= MAX_KEY_LENGTH) {
            made = PyUnicode_New(prefix_length + version_length + key_length + 2, 127);
            if (made != NULL) {
                out = PyUnicode_1BYTE_DATA(made);
                memcpy(out, PyUnicode_1BYTE_DATA(prefix), prefix_length);
                out += prefix_length;
                *out++ = ':';
                memcpy(out, version_text, version_length);
                out += version_length;
                *out++ = ':';
                memcpy(out, PyUnicode_1BYTE_DATA(key), key_length);
            }
        }
    }
    Py_XDECREF(version_str);
    return made == Py_None ? Py_NewRef(Py_None) : made;
}

static PyObject *
made_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *default_making, *prefix = NULL, *version = NULL, *made = NULL;
    int is_default;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "made_key takes 3 arguments, got %zd", nargs);
        return NULL;
    }
    default_making = PyObject_GetAttr(args[0], name_default_key_making);
    if (default_making == NULL) {
        return NULL;
    }
    is_default = PyObject_IsTrue(default_making);
    Py_DECREF(default_making);
    if (is_default <= 0) {
        return is_default < 0 ? NULL : Py_NewRef(Py_None);
    }
    prefix = PyObject_GetAttr(args[0], name_key_prefix);
    if (prefix != NULL) {
        version = args[2] == Py_None ? PyObject_GetAttr(args[0], name_version)
                                     : Py_NewRef(args[2]);
    }
    if (version != NULL) {
        made = joined_key(prefix, version, args[1]);
    }
    Py_XDECREF(prefix);
    Py_XDECREF(version);
    return made;
}

PyDoc_STRVAR(group_by_node_doc,
             "group_by_node(keys, node_index, count)\n--\n\n"
             "The keys in `count` lists, each key in list node_index(key)\n"
             "(routing.group_by_node_in_python).");

static PyObject *
group_by_node(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *keys, *node_index, *groups, *key, *index_object;
    Py_ssize_t count, index, node;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "group_by_node takes 3 arguments, got %zd", nargs);
        return NULL;
    }
    keys = args[0];
    node_index = args[1];
    count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_CheckExact(keys) || count < 0) {
        PyErr_SetString(PyExc_TypeError, "group_by_node takes a list and a count >= 0");
        return NULL;
    }
    groups = PyList_New(count);
    if (groups == NULL) {
        return NULL;
    }
    for (node = 0; node < count; node++) {
        PyObject *group = PyList_New(0);
        if (group == NULL) {
            goto error;
        }
        PyList_SET_ITEM(groups, node, group);
    }
    /* By index each time: node_index is Python code that could change the list. */
    for (index = 0; index < PyList_GET_SIZE(keys); index++) {
        key = Py_NewRef(PyList_GET_ITEM(keys, index));
        index_object = PyObject_CallOneArg(node_index, key);
        if (index_object == NULL) {
            Py_DECREF(key);
            goto error;
        }
        node = PyNumber_AsSsize_t(index_object, PyExc_IndexError);
        Py_DECREF(index_object);
        if (node == -1 && PyErr_Occurred()) {
            Py_DECREF(key);
            goto error;
        }
        if (node < 0) {
            node += count; /* As a list index, which the Python twin uses. */
        }
        if (node < 0 || node >= count) {
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            Py_DECREF(key);
            goto error;
        }
        if (PyList_Append(PyList_GET_ITEM(groups, node), key) < 0) {
            Py_DECREF(key);
            goto error;
        }
        Py_DECREF(key);
    }
    return groups;
error:
    Py_DECREF(groups);
    return NULL;
}

PyDoc_STRVAR(retrieval_request_doc,
             "retrieval_request(keys)\n--\n\n"
             "(b'get <key> <key>...\\r\\n', {key as sent: key}) for a list of str or bytes\n"
             "keys, str keys sent as UTF-8; None if a key is neither or is over 250 bytes\n"
             "(protocol.retrieval_request_in_python).");

static PyObject *
retrieval_request(PyObject *module, PyObject *keys)
{
    PyObject *asked = NULL, *sent, *key, *request, *result;
    Py_ssize_t index, count, total, length;
    const char *bytes;
    char *out;
    int refused = 0;

    if (!PyList_CheckExact(keys)) {
        PyErr_SetString(PyExc_TypeError, "retrieval_request takes a list");
        return NULL;
    }
    count = PyList_GET_SIZE(keys);
    sent = PyList_New(count);
    if (sent == NULL) {
        return NULL;
    }
    /* Every str is encoded, even after a key that refuses the request, as in Python. */
    total = 4 + 2; /* "get " and CRLF, with one space before every key but the first. */
    for (index = 0; index < count; index++) {
        key = PyList_GET_ITEM(keys, index);
        if (PyUnicode_CheckExact(key)) {
            bytes = PyUnicode_AsUTF8AndSize(key, &length);
            if (bytes == NULL) {
                goto error;
            }
            key = PyBytes_FromStringAndSize(bytes, length);
            if (key == NULL) {
                goto error;
            }
        }
        else if (PyBytes_CheckExact(key)) {
            length = PyBytes_GET_SIZE(key);
            Py_INCREF(key);
        }
        else {
            refused = 1;
            continue;
        }
        PyList_SET_ITEM(sent, index, key);
        refused |= length > MAX_KEY_LENGTH;
        total += length + (index > 0);
    }
    if (refused) {
        Py_DECREF(sent);
        Py_RETURN_NONE;
    }
    /* Every key sent is an exact bytes object: hashing them runs no Python code. */
    asked = PyDict_New();
    if (asked == NULL) {
        goto error;
    }
    for (index = 0; index < count; index++) {
        if (PyDict_SetItem(asked, PyList_GET_ITEM(sent, index), PyList_GET_ITEM(keys, index)) <
            0) {
            goto error;
        }
    }
    request = PyBytes_FromStringAndSize(NULL, total);
    if (request == NULL) {
        goto error;
    }
    out = PyBytes_AS_STRING(request);
    memcpy(out, "get ", 4);
    out += 4;
    for (index = 0; index < count; index++) {
        key = PyList_GET_ITEM(sent, index);
        if (index > 0) {
            *out++ = ' ';
        }
        memcpy(out, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
        out += PyBytes_GET_SIZE(key);
    }
    memcpy(out, "\r\n", 2);
    result = PyTuple_Pack(2, request, asked);
    Py_DECREF(request);
    Py_DECREF(asked);
    Py_DECREF(sent);
    return result;
error:
    Py_XDECREF(asked);
    Py_DECREF(sent);
    return NULL;
}

PyDoc_STRVAR(decoded_values_doc,
             "decoded_values(found, asked, decode, flag, decode_flagged, text_flags)\n--\n\n"
             "{asked[key]: decode(data, flags)} for every key: (flags, data) of a reply\n"
             "read by parse_values, decode_flagged instead of decode for the flags that\n"
             "have `flag`, and without a call the bytes of flags 0 and the UTF-8 text of\n"
             "flags `text_flags`; KeyError for a key not asked for\n"
             "(protocol.decoded_values_in_python).");

/*
 * The value of plain `data` (exact bytes) under `flags`, decoded here: the bytes themselves
 * for flags 0, UTF-8 text for `text_flags`. NULL without an error set: not plain, or other
 * flags; NULL with an error set: text that is not UTF-8.
 */
static PyObject *
plain_value(PyObject *flags, PyObject *data, long text_flags)
{
    long value;
    int overflow;

    if (!PyLong_CheckExact(flags) || !PyBytes_CheckExact(data)) {
        return NULL;
    }
    value = PyLong_AsLongAndOverflow(flags, &overflow);
    if (overflow != 0) {
        return NULL;
    }
    if (value == 0) {
        return Py_NewRef(data);
    }
    if (value == text_flags) {
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), NULL);
    }
    return NULL;
}

static PyObject *
decoded_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *found, *asked, *decode, *decode_flagged, *result, *key, *entry, *original;
    PyObject *value, *call_args[2], *flag, *flagged_object;
    Py_ssize_t position = 0;
    long text_flags;
    int flagged;

    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "decoded_values takes 6 arguments, got %zd", nargs);
        return NULL;
    }
    found = args[0];
    asked = args[1];
    decode = args[2];
    flag = args[3];
    decode_flagged = args[4];
    text_flags = PyLong_AsLong(args[5]);
    if (text_flags == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (text_flags == 0) {
        PyErr_SetString(PyExc_ValueError, "text_flags must not be 0, the flags of bytes");
        return NULL;
    }
    if (!PyDict_CheckExact(found) || !PyDict_CheckExact(asked)) {
        PyErr_SetString(PyExc_TypeError, "decoded_values takes two dicts");
        return NULL;
    }
    result = PyDict_New();
    if (result == NULL) {
        return NULL;
    }
    /* `found` is parse_values' own dict, which no one else holds: it cannot change. */
    while (PyDict_Next(found, &position, &key, &entry)) {
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
            PyErr_SetString(PyExc_TypeError, "decoded_values takes (flags, data) pairs");
            goto error;
        }
        original = PyDict_GetItemWithError(asked, key);
        if (original == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, key);
            }
            goto error;
        }
        Py_INCREF(original);
        value = plain_value(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1), text_flags);
        if (value == NULL && !PyErr_Occurred()) {
            /* `flags & flag`, as Python computes it: the flags are a Python int of any size. */
            flagged_object = PyNumber_And(PyTuple_GET_ITEM(entry, 0), flag);
            flagged = flagged_object == NULL ? -1 : PyObject_IsTrue(flagged_object);
            Py_XDECREF(flagged_object);
            if (flagged < 0) {
                Py_DECREF(original);
                goto error;
            }
            call_args[0] = PyTuple_GET_ITEM(entry, 1);
            call_args[1] = PyTuple_GET_ITEM(entry, 0);
            value = PyObject_Vectorcall(flagged ? decode_flagged : decode, call_args, 2, NULL);
        }
        if (value == NULL || PyDict_SetItem(result, original, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(original);
            goto error;
        }
        Py_DECREF(value);
        Py_DECREF(original);
    }
    return result;
error:
    Py_DECREF(result);
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

/*
 * The single-key call (`routing.pooled_call_in_python`): the key's node's pool, a client
 * borrowed from it, the call, the client given back. Only the pool's common case is done
 * here, exactly as `NodePool.borrow` and `NodePool.give_back` do it under the pool's lock:
 * an idle client lent while the node has no failures, and handed back to a pool that is not
 * retired and has no waiter.
 * Anything else (and a lock another thread holds) goes to those Python methods, which
 * decide it; an exception from the call goes to `NodePool.give_back_after`, as in Python.
 *
 * No Python code runs between the borrow and the call, or between the call and the
 * give-back, so no interruption (a signal handler's exception, a gevent timeout) can land
 * there: a client is either in the pool, or with this call. So the client is marked as
 * lent to this thread (`_lent_to`, which lets the pool free the slot of a client an
 * interruption left with its borrower) only if the call raised, before the give-back
 * decides about it.
 *
 * The pool's lock is not taken here but found free (`lock_is_free`): that relies on the
 * GIL, which a free-threaded build turns back on for this module, as it declares no
 * `Py_mod_gil` slot.
 */

static PyObject *threading_module;
static PyObject *name_get_ident, *name_failures, *name_lent_to, *name_lock, *name_idle,
    *name_retired, *name_waiting, *name_borrow, *name_give_back, *name_give_back_after,
    *name_locked, *name_settle_interrupted;

static int
intern_names(void)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&name_get_ident, "get_ident"},
        {&name_failures, "_failures"},
        {&name_lent_to, "_lent_to"},
        {&name_lock, "_lock"},
        {&name_idle, "_idle"},
        {&name_retired, "_retired"},
        {&name_waiting, "_waiting"},
        {&name_borrow, "borrow"},
        {&name_give_back, "give_back"},
        {&name_give_back_after, "give_back_after"},
        {&name_locked, "locked"},
        {&name_settle_interrupted, "_settle_interrupted"},
        {&name_default_key_making, "_default_key_making"},
        {&name_key_prefix, "key_prefix"},
        {&name_version, "version"},
    };
    size_t index;

    for (index = 0; index < sizeof(names) / sizeof(names[0]); index++) {
        *names[index].name = PyUnicode_InternFromString(names[index].text);
        if (*names[index].name == NULL) {
            return -1;
        }
    }
    threading_module = PyImport_ImportModule("threading");
    return threading_module == NULL ? -1 : 0;
}

/* 1 if `object` is the int 0, 0 if it is anything else (or missing). */
static int
is_zero(PyObject *object)
{
    return object != NULL && PyLong_CheckExact(object) && PyLong_AsLong(object) == 0;
}

/*
 * 1 if the pool's lock is free, 0 if some thread holds it, -1 with an error set. A free
 * lock stays free while this thread holds the GIL and runs no Python code: between this
 * check and the end of its change to the idle list, nothing here runs Python code (the
 * attributes read and set are plain instance attributes), as if the lock were held.
 */
static int
lock_is_free(PyObject *pool_state)
{
    PyObject *lock = PyDict_GetItemWithError(pool_state, name_lock), *held;
    int free;

    if (lock == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    held = PyObject_CallMethodNoArgs(lock, name_locked);
    if (held == NULL) {
        return -1;
    }
    free = held == Py_False;
    Py_DECREF(held);
    return free;
}

/*
 * The pool's instance attributes, if the node has no failures (`_failures` is 0): a new
 * reference, or NULL, with an error set or (there are failures) without one.
 */
static PyObject *
state_of_a_healthy_pool(PyObject *pool)
{
    PyObject *state = PyObject_GenericGetDict(pool, NULL);

    if (state != NULL && !(PyDict_CheckExact(state) &&
                           is_zero(PyDict_GetItemWithError(state, name_failures)))) {
        Py_CLEAR(state);
    }
    return state;
}

/*
 * Mark `client` as lent to this thread (`_lent_to`, as `borrow` does): 0, or -1 with an
 * error set. threading's `get_ident`, looked up each time: gevent's monkey-patching
 * replaces it.
 */
static int
mark_lent(PyObject *client)
{
    PyObject *get_ident = PyObject_GetAttr(threading_module, name_get_ident), *borrower;
    int result;

    if (get_ident == NULL) {
        return -1;
    }
    borrower = PyObject_CallNoArgs(get_ident);
    Py_DECREF(get_ident);
    if (borrower == NULL) {
        return -1;
    }
    result = PyObject_SetAttr(client, name_lent_to, borrower);
    Py_DECREF(borrower);
    return result;
}

/*
 * Unmark a client (`_lent_to` None, as `give_back` does), writing only if it is marked:
 * 0, or -1 with an error set.
 */
static int
unmark_lent(PyObject *client)
{
    PyObject *borrower = PyObject_GetAttr(client, name_lent_to);
    int result = 0;

    if (borrower == NULL) {
        return -1;
    }
    if (borrower != Py_None) {
        result = PyObject_SetAttr(client, name_lent_to, Py_None);
    }
    Py_DECREF(borrower);
    return result;
}

/*
 * `NodePool.borrow`'s common case. 1: `*lent` is the client lent (a new reference). 0: the
 * common case does not hold, nothing was changed. -1: an error is set.
 *
 * With `mark`, the client is marked as lent to this thread before it leaves the idle list,
 * as `borrow` does: Python code will run before it is handed back, and an interruption
 * there leaves it with its borrower. Without, it is left unmarked (a mark an interrupted
 * `give_back` left on it is cleared): `pooled_call` runs no Python code until the
 * library's call returns or raises, and marks the client if it raised (`mark_lent`).
 */
static int
lend_idle(PyObject *pool, PyObject **lent, int mark)
{
    PyObject *state, *idle, *client;
    Py_ssize_t count;
    int result = -1, free;

    *lent = NULL;
    state = state_of_a_healthy_pool(pool);
    if (state == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    free = lock_is_free(state);
    idle = free > 0 ? PyDict_GetItemWithError(state, name_idle) : NULL;
    if (idle == NULL || !PyList_CheckExact(idle) || (count = PyList_GET_SIZE(idle)) == 0) {
        result = PyErr_Occurred() ? -1 : 0;
    }
    else {
        client = PyList_GET_ITEM(idle, count - 1);
        Py_INCREF(client);
        if ((mark ? mark_lent(client) : unmark_lent(client)) < 0 ||
            PyList_SetSlice(idle, count - 1, count, NULL) < 0) {
            Py_DECREF(client);
        }
        else {
            *lent = client;
            result = 1;
        }
    }
    Py_DECREF(state);
    return result;
}

/*
 * `NodePool.give_back`'s common case: 1 if the client is idle again, 0 if the common case
 * does not hold (nothing was changed), -1 with an error set.
 */
static int
pool_idle(PyObject *pool, PyObject *client)
{
    PyObject *state = state_of_a_healthy_pool(pool), *retired, *waiting, *idle;
    int result;

    if (state == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    result = lock_is_free(state);
    if (result > 0) {
        retired = PyDict_GetItemWithError(state, name_retired);
        waiting = PyDict_GetItemWithError(state, name_waiting);
        idle = PyDict_GetItemWithError(state, name_idle);
        if (retired != Py_False || !is_zero(waiting) || idle == NULL || !PyList_CheckExact(idle)) {
            result = PyErr_Occurred() ? -1 : 0;
        }
        else if (PyList_Append(idle, client) < 0 || unmark_lent(client) < 0) {
            result = -1;
        }
    }
    Py_DECREF(state);
    return result;
}

/* The exception being raised, taken: a new reference. */
static PyObject *
take_error(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;

    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

/* Raise `error` again (stolen). */
static void
raise_again(PyObject *error)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(error);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, PyException_GetTraceback(error));
#endif
}

/*
 * Raise `error` (stolen) again once a handler of it ran and returned `handled` (stolen); if
 * the handler raised instead (`handled` NULL), raise what it raised, in the context of
 * `error`, as an `except` block that raises does.
 */
static void
raise_after(PyObject *error, PyObject *handled)
{
    PyObject *raised;

    if (handled != NULL) {
        Py_DECREF(handled);
        raise_again(error);
        return;
    }
    raised = take_error();
    if (raised != error) {
        PyException_SetContext(raised, error);
    }
    else {
        Py_DECREF(error);
    }
    raise_again(raised);
}

PyDoc_STRVAR(pooled_call_doc,
             "pooled_call(pools, node_index, is_node_failure, method, key, *args)\n--\n\n"
             "getattr(client, method)(key, *args) on a client of the key's node borrowed\n"
             "from its pool, pools[node_index(key)] (pools[0] when node_index is None),\n"
             "and given back (routing.pooled_call_in_python).");

static PyObject *
pooled_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *pool, *client, *result = NULL, *error, *index_object, *done;
    PyObject *small[8], **call_args = small;
    Py_ssize_t index, extra;
    int lent, pooled;

    if (nargs < 5) {
        PyErr_Format(PyExc_TypeError, "pooled_call takes at least 5 arguments, got %zd", nargs);
        return NULL;
    }
    if (args[1] == Py_None) {
        index = 0;
    }
    else {
        index_object = PyObject_CallOneArg(args[1], args[4]);
        if (index_object == NULL) {
            return NULL;
        }
        index = PyLong_AsSsize_t(index_object);
        Py_DECREF(index_object);
        if (index == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    pool = PySequence_GetItem(args[0], index);
    if (pool == NULL) {
        return NULL;
    }
    lent = lend_idle(pool, &client, 0);
    if (lent == 0) {
        client = PyObject_CallMethodNoArgs(pool, name_borrow);
    }
    if (client == NULL) {
        Py_DECREF(pool);
        return NULL;
    }
    /* client.method(key, *args), with a spare first slot for vectorcall's use. */
    extra = nargs - 5;
    if (extra + 3 > (Py_ssize_t)(sizeof(small) / sizeof(small[0]))) {
        call_args = PyMem_New(PyObject *, extra + 3);
        if (call_args == NULL) {
            PyErr_NoMemory();
            goto failed;
        }
    }
    call_args[1] = client;
    call_args[2] = args[4];
    memcpy(call_args + 3, args + 5, extra * sizeof(PyObject *));
    result = PyObject_VectorcallMethod(
        args[3], call_args + 1, (2 + extra) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (call_args != small) {
        PyMem_Free(call_args);
    }
    if (result == NULL) {
        goto failed;
    }
    pooled = pool_idle(pool, client);
    if (pooled == 0) {
        done = PyObject_CallMethodOneArg(pool, name_give_back, client);
        Py_XDECREF(done);
        pooled = done == NULL ? -1 : 1;
    }
    if (pooled > 0) {
        Py_DECREF(client);
        Py_DECREF(pool);
        return result;
    }
    Py_CLEAR(result);
failed:
    /* As `except BaseException as error: pool.give_back_after(...); raise`. */
    error = take_error();
    if (error == NULL) {
        PyErr_SetString(PyExc_SystemError, "pooled_call: a call failed without an exception");
        error = take_error();
    }
    if (lent > 0 && mark_lent(client) < 0) {
        /* Only a failed allocation gets here: the call's own error is the one raised. */
        PyErr_WriteUnraisable(client);
    }
    raise_after(error, PyObject_CallMethodObjArgs(pool, name_give_back_after, client, error,
                                                  args[2], NULL));
    Py_DECREF(client);
    Py_DECREF(pool);
    return NULL;
}

PyDoc_STRVAR(borrow_doc,
             "borrow(pool)\n--\n\n"
             "pool.borrow(), its common case (an idle client of a healthy pool) done here.");

static PyObject *
borrow(PyObject *module, PyObject *pool)
{
    PyObject *client;
    int lent = lend_idle(pool, &client, 1);

    if (lent < 0) {
        return NULL;
    }
    return lent > 0 ? client : PyObject_CallMethodNoArgs(pool, name_borrow);
}

PyDoc_STRVAR(give_back_doc,
             "give_back(pool, client)\n--\n\n"
             "pool.give_back(client), its common case (a healthy pool that is not retired\n"
             "and has no waiter) done here.");

static PyObject *
give_back(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int pooled;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "give_back takes 2 arguments, got %zd", nargs);
        return NULL;
    }
    pooled = pool_idle(args[0], args[1]);
    if (pooled < 0) {
        /* As `give_back`: `except BaseException: self._settle_interrupted(client); raise`. */
        PyObject *error = take_error();
        raise_after(error, PyObject_CallMethodOneArg(args[0], name_settle_interrupted, args[1]));
        return NULL;
    }
    if (pooled == 0) {
        return PyObject_CallMethodOneArg(args[0], name_give_back, args[1]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"prefixed_keys", (PyCFunction)(void (*)(void))prefixed_keys, METH_FASTCALL,
     prefixed_keys_doc},
    {"made_key", (PyCFunction)(void (*)(void))made_key, METH_FASTCALL, made_key_doc},
    {"group_by_node", (PyCFunction)(void (*)(void))group_by_node, METH_FASTCALL,
     group_by_node_doc},
    {"retrieval_request", retrieval_request, METH_O, retrieval_request_doc},
    {"decoded_values", (PyCFunction)(void (*)(void))decoded_values, METH_FASTCALL,
     decoded_values_doc},
    {"parse_values", (PyCFunction)(void (*)(void))parse_values, METH_FASTCALL,
     parse_values_doc},
    {"pooled_call", (PyCFunction)(void (*)(void))pooled_call, METH_FASTCALL, pooled_call_doc},
    {"borrow", borrow, METH_O, borrow_doc},
    {"give_back", (PyCFunction)(void (*)(void))give_back, METH_FASTCALL, give_back_doc},
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
    if (intern_names() < 0) {
        return NULL;
    }
    return PyModuleDef_Init(&speedups_module);
}
