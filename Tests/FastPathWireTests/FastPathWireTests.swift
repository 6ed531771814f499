import Testing

@testable import FastPathWire

@Suite struct FastPathWireTests {
    static let request = FastPathWire.Request(
        operation: .sign, session: 7, mechanism: 0x1041, parameter: [], key: 0x8000_0000_0000_0001,
        data: Array(repeating: 0xAB, count: 32))

    func decodeRequest(_ bytes: [UInt8]) -> FastPathWire.Request? {
        bytes.withUnsafeBytes { FastPathWire.decodeRequest($0) }
    }

    func decodeReply(_ bytes: [UInt8]) -> FastPathWire.Reply? {
        bytes.withUnsafeBytes { FastPathWire.decodeReply($0) }
    }

    @Test func requestsRoundTrip() throws {
        var verify = Self.request
        verify.operation = .verify
        verify.signature = [1, 2, 3]
        verify.parameter = [9, 9]
        for r in [Self.request, verify] {
            let bytes = try #require(FastPathWire.encode(r))
            #expect(decodeRequest(bytes) == r)
        }
    }

    @Test func repliesRoundTrip() {
        for r: FastPathWire.Reply in [.output([]), .output([1, 2, 3]), .error(name: "org.pincache.Error.NotLoggedIn", message: "é (0x101)")] {
            #expect(decodeReply(FastPathWire.encode(r)) == r)
        }
    }

    @Test func everyTruncationAndExtensionIsRefused() throws {
        let bytes = try #require(FastPathWire.encode(Self.request))
        for n in 0..<bytes.count { #expect(decodeRequest(Array(bytes.prefix(n))) == nil) }
        #expect(decodeRequest(bytes + [0]) == nil)
        let reply = FastPathWire.encode(.output([5, 6]))
        for n in 0..<reply.count { #expect(decodeReply(Array(reply.prefix(n))) == nil) }
        #expect(decodeReply(reply + [0]) == nil)
    }

    @Test func lengthsThatDoNotAddUpOrOverflowAreRefused() throws {
        var bytes = try #require(FastPathWire.encode(Self.request))
        // dataCount (offset 36) near UInt32.max: count arithmetic must not wrap.
        bytes.replaceSubrange(36..<40, with: [0xFF, 0xFF, 0xFF, 0xFF])
        #expect(decodeRequest(bytes) == nil)
        // A signature on a sign request.
        var sign = Self.request
        sign.signature = [1]
        #expect(FastPathWire.encode(sign) == nil)
        var forged = try #require(FastPathWire.encode(Self.request))
        forged.replaceSubrange(40..<44, with: [1, 0, 0, 0])
        forged.append(0)
        #expect(decodeRequest(forged) == nil)
        // Unknown operation, wrong magic.
        var op = try #require(FastPathWire.encode(Self.request))
        op[4] = 9
        #expect(decodeRequest(op) == nil)
        var magic = try #require(FastPathWire.encode(Self.request))
        magic[0] ^= 1
        #expect(decodeRequest(magic) == nil)
    }

    @Test func oversizedRequestsDoNotFit() {
        var big = Self.request
        big.data = Array(repeating: 0, count: FastPathWire.maxData + 1)
        #expect(!big.fits)
        #expect(FastPathWire.encode(big) == nil)
        big.data = Array(repeating: 0, count: FastPathWire.maxData)
        #expect(big.fits)
    }

    @Test func errorNamesAreCheckedAndMessagesCut() {
        // A name with a byte outside [A-Za-z0-9_.] is refused.
        var bad = FastPathWire.encode(.error(name: "org.x.Bad", message: ""))
        bad[16 + 3] = 0x2F  // '/'
        #expect(decodeReply(bad) == nil)
        // Invalid UTF-8 in the message is refused.
        var badText = FastPathWire.encode(.error(name: "a.B", message: "ok"))
        badText[badText.count - 1] = 0xFF
        #expect(decodeReply(badText) == nil)
        // Long messages are cut on a character boundary and still decode.
        let long = String(repeating: "é", count: FastPathWire.maxErrorMessage)
        guard case .error(_, let m)? = decodeReply(FastPathWire.encode(.error(name: "a.B", message: long))) else {
            Issue.record("long message did not decode")
            return
        }
        #expect(m.utf8.count <= FastPathWire.maxErrorMessage && m.allSatisfy { $0 == "é" })
    }
}
