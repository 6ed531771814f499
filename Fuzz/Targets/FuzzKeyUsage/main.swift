import FuzzDriver
import FuzzSupport
import Glibc
import PinPolicy

// CertificateKeyUsage.parse: the DER of a certificate read from the token, which the
// token's owner (or whoever wrote to it) controls.
@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let der = Array(UnsafeBufferPointer(start: data, count: size))
    if let mask = CertificateKeyUsage.parse(certificateDER: der) {
        // The seed's mask: the BIT STRING's first byte, plus decipherOnly as 0x8000.
        expect(mask & ~(0xFF | CertificateKeyUsage.decipherOnly) == 0, "mask \(mask) has bits the seed does not define")
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
