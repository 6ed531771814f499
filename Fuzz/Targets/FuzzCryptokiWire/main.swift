import FastPathWire
import FuzzDriver
import FuzzSupport
import Glibc

// The fast path's two decoders: requests (bytes from any local process that holds a fast
// path, read by the daemon) and replies (bytes from the daemon, read inside every host
// application). The first input byte picks the decoder. What decodes must encode back to
// exactly the same frame: there is one layout, so nothing is read that was not checked.
@_cdecl("LLVMFuzzerTestOneInput")
func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    let frame = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    if data[0] & 1 == 0 {
        if let request = FastPathWire.decodeRequest(frame) {
            expect(request.fits, "a decoded request does not fit a frame")
            expect(FastPathWire.encode(request).map { $0.elementsEqual(frame) } ?? false, "request does not re-encode to its frame")
        }
    } else if let reply = FastPathWire.decodeReply(frame) {
        expect(FastPathWire.encode(reply).elementsEqual(frame), "reply does not re-encode to its frame")
    }
    return 0
}

exit(pincache_fuzz_main(CommandLine.argc, CommandLine.unsafeArgv, fuzzOne))
