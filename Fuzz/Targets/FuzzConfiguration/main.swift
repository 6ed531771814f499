import FuzzDriver
import Glibc
import PinPolicy

// pincache.cfg as the daemon reads it (Configuration.load): bytes, UTF-8 check, parse.
@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    guard let text = String(validating: bytes, as: UTF8.self) else { return 0 }
    _ = try? Configuration.parse(text, file: "fuzz.cfg")
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
