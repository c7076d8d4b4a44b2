/* dockercoins._native: SHA-256 of every block of a batch, and a keystream, in one call each.
 *
 * Both loops run over the system's OpenSSL libcrypto (the library hashlib itself links) with the
 * GIL released, and write into one new bytes object: no Python runs per block. Plain C, no
 * architecture-specific code: libcrypto picks SHA-NI, ARMv8 crypto or its portable code itself.
 *
 * SHA256_Init/Update/Final are deprecated in OpenSSL 3 but still exported, and the fastest way
 * to hash many small inputs there: the one-shot SHA256() and EVP_Digest() fetch the algorithm on
 * every call (7x slower on 32-byte inputs), a reused EVP_MD_CTX is about 1.7x slower.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_API_COMPAT 0x10100000L
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <string.h>

#define KEYSTREAM_CHUNK 16384

static const unsigned char zeros[KEYSTREAM_CHUNK];

static PyObject *
sha256_blocks(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "y*n:sha256_blocks", &data, &block_size)) {
        return NULL;
    }
    if (block_size < 0 || (block_size > 0 && data.len % block_size != 0) ||
        (block_size > 0 && data.len == 0)) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError,
                            "data of %zd bytes is not a whole, non-empty number of %zd-byte blocks",
                            data.len, block_size);
    }
    Py_ssize_t blocks = block_size ? data.len / block_size : 1;
    Py_ssize_t step = block_size ? block_size : data.len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, blocks * SHA256_DIGEST_LENGTH);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const unsigned char *in = data.buf;
    unsigned char *digest = (unsigned char *)PyBytes_AS_STRING(out);
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    SHA256_CTX ctx;
    for (Py_ssize_t i = 0; i < blocks && ok; i++) {
        ok = SHA256_Init(&ctx) && SHA256_Update(&ctx, in, (size_t)step) &&
             SHA256_Final(digest, &ctx);
        in += step;
        digest += SHA256_DIGEST_LENGTH;
    }
    OPENSSL_cleanse(&ctx, sizeof(ctx));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (!ok) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_RuntimeError, "libcrypto's SHA-256 failed");
    }
    return out;
}

static PyObject *
keystream(PyObject *module, PyObject *args)
{
    const char *cipher_name;
    Py_buffer key, iv;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "sy*y*n:keystream", &cipher_name, &key, &iv, &size)) {
        return NULL;
    }
    PyObject *out = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    const EVP_CIPHER *cipher = EVP_get_cipherbyname(cipher_name);
    if (cipher == NULL) {
        PyErr_Format(PyExc_ValueError, "libcrypto has no cipher %s", cipher_name);
        goto done;
    }
    if (key.len != EVP_CIPHER_key_length(cipher) || iv.len != EVP_CIPHER_iv_length(cipher)) {
        PyErr_Format(PyExc_ValueError, "%s takes a %d-byte key and a %d-byte iv", cipher_name,
                     EVP_CIPHER_key_length(cipher), EVP_CIPHER_iv_length(cipher));
        goto done;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be 0 or more");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        goto done;
    }
    ctx = EVP_CIPHER_CTX_new();
    int ok = ctx != NULL;
    unsigned char *dest = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    ok = ok && EVP_EncryptInit_ex(ctx, cipher, NULL, key.buf, iv.buf);
    /* A stream cipher's encryption of zeros is its keystream. */
    for (Py_ssize_t offset = 0; ok && offset < size; offset += KEYSTREAM_CHUNK) {
        int chunk = (int)(size - offset < KEYSTREAM_CHUNK ? size - offset : KEYSTREAM_CHUNK);
        int written = 0;
        ok = EVP_EncryptUpdate(ctx, dest + offset, &written, zeros, chunk) && written == chunk;
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_CLEAR(out);
        PyErr_Format(PyExc_RuntimeError, "libcrypto's %s failed", cipher_name);
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    PyBuffer_Release(&key);
    PyBuffer_Release(&iv);
    return out;
}

static PyMethodDef methods[] = {
    {"sha256_blocks", sha256_blocks, METH_VARARGS,
     "sha256_blocks(data, block_size) -> bytes\n\n"
     "The SHA-256 digests of every block_size-byte block of data (block_size 0: of the whole\n"
     "data), concatenated; the GIL is released meanwhile."},
    {"keystream", keystream, METH_VARARGS,
     "keystream(cipher, key, iv, size) -> bytes\n\n"
     "size bytes of the stream cipher's keystream under key and iv (libcrypto's name for the\n"
     "cipher, such as 'chacha20'); the GIL is released meanwhile."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dockercoins._native",
    "SHA-256 of a batch of blocks and a stream cipher's keystream, over libcrypto.", -1, methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
