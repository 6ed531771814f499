// libpincache-pkcs11.so: PincacheProxy's code, linked with the Swift runtime inside and only
// C_GetFunctionList exported (Package.swift). Nothing to add here: the target exists so that
// those linker flags apply to the shared object and not to the tests that link the proxy.
@_exported import PincacheProxy
