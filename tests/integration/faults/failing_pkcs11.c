/* A PKCS#11 module for the fault tests (tests/integration/faults/conftest.py builds it): every call
 * goes to the real module (REAL_MODULE, set when this file is compiled) until the file named by
 * $ISCL_TEST_P11_FAIL_IF exists. From then on every call that uses a key, finds objects or draws
 * random numbers fails with CKR_DEVICE_ERROR, as a module whose device broke would; the calls that
 * end sessions still go through, so a process can close cleanly.
 *
 * Only C_GetFunctionList is exported: python-pkcs11 (and iscl_hsm.keyholder.p11direct) find every
 * other function through the list it returns. The list is laid out by each function's index in
 * PKCS#11 v2.40's CK_FUNCTION_LIST, so no pkcs11.h is needed to build this. */
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

typedef unsigned long CK_RV;
typedef unsigned long Word;
typedef void *Fn;
typedef CK_RV (*Call)(Word, Word, Word, Word, Word, Word);

#define CKR_OK 0x000UL
#define CKR_GENERAL_ERROR 0x005UL
#define CKR_DEVICE_ERROR 0x030UL

typedef struct {
    unsigned char major, minor; /* CK_VERSION */
    Fn fn[68];
} FunctionList;

/* The functions that fail, with their index in the list. */
#define FAILING(X) \
    X(C_FindObjectsInit, 26) X(C_EncryptInit, 29) X(C_Encrypt, 30) X(C_EncryptUpdate, 31) \
    X(C_EncryptFinal, 32) X(C_DecryptInit, 33) X(C_Decrypt, 34) X(C_DecryptUpdate, 35) \
    X(C_DecryptFinal, 36) X(C_GenerateKey, 58) X(C_DeriveKey, 62) X(C_GenerateRandom, 64)

static FunctionList *real;
static FunctionList ours;

static int broken(void) {
    const char *trigger = getenv("ISCL_TEST_P11_FAIL_IF");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

/* Each argument of these functions is a CK_ULONG or a pointer, and none takes more than six, so six
 * machine words pass any of them on unchanged (x86-64 and AArch64 pass them all in registers). */
#define WRAPPER(name, index) \
    static CK_RV wrap_##name(Word a, Word b, Word c, Word d, Word e, Word f) { \
        return broken() ? CKR_DEVICE_ERROR : ((Call)real->fn[index])(a, b, c, d, e, f); \
    }
FAILING(WRAPPER)

#define INSTALL(name, index) ours.fn[index] = (Fn)wrap_##name;

CK_RV C_GetFunctionList(FunctionList **list) {
    if (real == NULL) {
        void *module = dlopen(REAL_MODULE, RTLD_NOW | RTLD_LOCAL);
        CK_RV (*get)(FunctionList **) = module ? (CK_RV (*)(FunctionList **))dlsym(module, "C_GetFunctionList") : NULL;
        if (get == NULL || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
        ours = *real;
        FAILING(INSTALL)
    }
    *list = &ours;
    return CKR_OK;
}
