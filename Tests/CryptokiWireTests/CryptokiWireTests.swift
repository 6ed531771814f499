import Foundation
import Testing

@testable import CryptokiWire

@Suite struct CryptokiWireTests {
    @Test func idsAreTheirIndexAndNamesUnique() {
        for (index, call) in Calls.all.enumerated() { #expect(Int(call.id) == index) }
        #expect(Set(Calls.all.map(\.name)).count == Calls.all.count)
    }

    static let signRequest: [WireValue] = [
        .ulong(7), .record([.ulong(0x1041), .bytes([])]), .ulong(0x8000_0000_0000_0001), .bytes(Array(repeating: 0xAB, count: 32)),
    ]

    func decode(_ frame: [UInt8], _ fields: [Field]) throws -> (FrameHeader, [WireValue]) {
        try frame.withUnsafeBytes { raw in
            let header = try #require(try Frames.header(raw))
            #expect(Int(header.bodyLength) == raw.count - FrameHeader.size)
            var d = WireDecoder(UnsafeRawBufferPointer(rebasing: raw[FrameHeader.size...]))
            return (header, try d.decodeAll(fields))
        }
    }

    @Test func requestsRoundTrip() throws {
        let frame = try Frames.encode(tag: 9, call: Calls.sign.id, kind: .request, Self.signRequest, as: Calls.sign.request)
        let (header, values) = try decode(frame, Calls.sign.request)
        #expect(header == FrameHeader(bodyLength: UInt32(frame.count - 12), tag: 9, call: 17, kind: .request))
        #expect(values == Self.signRequest)
    }

    @Test func everyCallRoundTripsItsEmptiestValues() throws {
        func empty(_ t: FieldType) -> WireValue {
            switch t {
            case .ulong: .ulong(0)
            case .bytes, .secret: .bytes([])
            case .string: .string("")
            case .array: .array([])
            case .record(let fields): .record(fields.map { empty($0.type) })
            }
        }
        for call in Calls.all {
            for fields in [call.request, call.response] {
                let values = fields.map { empty($0.type) }
                let frame = try Frames.encode(tag: 1, call: call.id, kind: .reply, values, as: fields)
                #expect(try decode(frame, fields).1 == values)
            }
        }
    }

    @Test func capsAreEnforcedOnBothSides() throws {
        // The encoder refuses to send what the decoder must refuse.
        var tooMany = Self.signRequest
        tooMany[1] = .record([.ulong(1), .bytes(Array(repeating: 0, count: Caps.mechanismParameter + 1))])
        #expect(throws: WireError.self) {
            try Frames.encode(tag: 1, call: 17, kind: .request, tooMany, as: Calls.sign.request)
        }
        // A decoder given a count over its cap refuses before allocating.
        var e = WireEncoder()
        e.put(UInt64(1))
        e.put(UInt32(Caps.templateEntries + 1))
        e.bytes.withUnsafeBytes { raw in
            var d = WireDecoder(raw)
            #expect(throws: WireError.self) { try d.decodeAll(Calls.createObject.request) }
        }
        // A count that the frame cannot hold.
        var short = WireEncoder()
        short.put(UInt64(1))
        short.put(UInt32(200))
        short.bytes.withUnsafeBytes { raw in
            var d = WireDecoder(raw)
            #expect(throws: WireError.self) { try d.decodeAll(Calls.createObject.request) }
        }
    }

    @Test func trailingBytesTruncationAndBadTextAreRefused() throws {
        let frame = try Frames.encode(tag: 1, call: 17, kind: .request, Self.signRequest, as: Calls.sign.request)
        let body = Array(frame[FrameHeader.size...])
        for bad in [body + [0], Array(body.dropLast())] {
            bad.withUnsafeBytes { raw in
                var d = WireDecoder(raw)
                #expect(throws: WireError.self) { try d.decodeAll(Calls.sign.request) }
            }
        }
        var e = WireEncoder()
        e.put(UInt32(2))
        e.bytes += [0xC3, 0x28]  // not UTF-8
        e.put(UInt64(0))
        e.bytes.withUnsafeBytes { raw in
            var d = WireDecoder(raw)
            #expect(throws: WireError.self) { try d.decodeAll(Calls.openSession.request) }
        }
    }

    @Test func headersRefuseUnknownKindsAndOversizeBodies() throws {
        var e = WireEncoder()
        e.put(UInt32(Caps.frameBody + 1))
        e.put(UInt32(1))
        e.put(UInt16(1))
        e.put(UInt8(0))
        e.put(UInt8(0))
        #expect(throws: WireError.self) { try e.bytes.withUnsafeBytes { try Frames.header($0) } }
        var kind = WireEncoder()
        kind.put(UInt32(0))
        kind.put(UInt32(1))
        kind.put(UInt16(1))
        kind.put(UInt8(3))
        kind.put(UInt8(0))
        #expect(throws: WireError.self) { try kind.bytes.withUnsafeBytes { try Frames.header($0) } }
    }

    @Test func secretsGoToTheSinkInPlace() throws {
        let values: [WireValue] = [.ulong(3), .ulong(1), .bytes(Array("123456".utf8))]
        let frame = try Frames.encode(tag: 1, call: 7, kind: .request, values, as: Calls.login.request)
        var seen: [UInt8] = []
        let decoded = try frame.withUnsafeBytes { raw in
            var d = WireDecoder(UnsafeRawBufferPointer(rebasing: raw[FrameHeader.size...])) { secret in
                seen = Array(secret)
                return 42
            }
            return try d.decodeAll(Calls.login.request)
        }
        #expect(decoded == [.ulong(3), .ulong(1), .secret(42)])
        #expect(seen == Array("123456".utf8))
    }

    @Test func frameBufferSplitsAStreamIntoFramesAndWipesThem() throws {
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let a = try Frames.encode(tag: 1, call: 17, kind: .request, Self.signRequest, as: Calls.sign.request)
        let b = Frames.error(tag: 2, call: 17, rv: 0xa0, message: "CKR_PIN_INCORRECT")
        let stream = a + b
        // Byte by byte: the reader must reassemble.
        let buffer = FrameBuffer(capacity: 16)
        var frames: [(FrameHeader, [UInt8])] = []
        for byte in stream {
            _ = [byte].withUnsafeBytes { write(fds[0], $0.baseAddress, 1) }
            #expect(buffer.read(from: fds[1]) == 1)
            while let (header, body) = try buffer.next() {
                frames.append((header, Array(body)))
                buffer.consume(header)
            }
        }
        #expect(frames.count == 2)
        #expect(frames[0].0.tag == 1 && frames[1].0.kind == .error)
        var d = frames[1].1.withUnsafeBytes { raw in Array(raw) }
        let error = try d.withUnsafeMutableBytes { raw in
            var dec = WireDecoder(UnsafeRawBufferPointer(raw))
            return try dec.decodeAll(Frames.errorFields)
        }
        d.removeAll()
        #expect(error == [.ulong(0xa0), .string("CKR_PIN_INCORRECT")])
    }

    @Test func theCheckedInTableIsTheDeclaredOne() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let file = try String(contentsOf: repo.appendingPathComponent("dbus/cryptoki-wire.json"), encoding: .utf8)
        #expect(file == Calls.json(), "regenerate with: pincached --print-wire-table > dbus/cryptoki-wire.json")
    }
}
