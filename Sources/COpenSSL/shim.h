#ifndef DEDUPD_COPENSSL_SHIM_H
#define DEDUPD_COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <openssl/sha.h>

// Macros in OpenSSL's headers that Swift cannot call, as functions.
static inline long dedupd_ssl_set_server_name(SSL *ssl, const char *name) {
    return SSL_set_tlsext_host_name(ssl, name);
}
static inline int dedupd_ssl_ctx_set_min_tls12(SSL_CTX *ctx) {
    return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
}

// SHA-256 of a short key on the caller's stack, for the compact seen-set's digests. OpenSSL 3
// deprecated these low-level calls in favour of EVP, but its one-shot SHA256() now goes through
// EVP_Q_digest, which looks the algorithm up and allocates a context on every call; for keys of a
// few dozen bytes that costs more than the hash. Builds without the deprecated API use SHA256().
static inline void dedupd_sha256(const void *data, size_t length, unsigned char *digest) {
#ifndef OPENSSL_NO_DEPRECATED_3_0
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
    SHA256_CTX context;
    SHA256_Init(&context);
    SHA256_Update(&context, data, length);
    SHA256_Final(digest, &context);
#pragma clang diagnostic pop
#else
    SHA256((const unsigned char *)data, length, digest);
#endif
}
#endif
