import CDBus

// What every message-shaped fuzz target does first: turn the input into a D-Bus message
// exactly as libdbus would accept it from a socket (header, padding, body validated
// against its signature), so the decoders see what a hostile peer can really send.

/// The input as one D-Bus message (a new reference, released by the caller), or nil
/// when libdbus refuses it.
public func demarshal(_ data: UnsafePointer<UInt8>?, _ size: Int) -> OpaquePointer? {
    guard let data, size > 0, size <= Int(Int32.max) else { return nil }
    var error = CDBus.DBusError()
    dbus_error_init(&error)
    // SAFETY: libdbus copies `size` bytes from `data` before returning.
    let message = data.withMemoryRebound(to: CChar.self, capacity: size) {
        dbus_message_demarshal($0, Int32(size), &error)
    }
    dbus_error_free(&error)
    return message
}

/// The body signature of `message`.
public func bodySignature(_ message: OpaquePointer) -> String {
    dbus_message_get_signature(message).map { String(cString: $0) } ?? ""
}

/// Reads every byte of `buffer`, so AddressSanitizer sees any buffer that is shorter than
/// it claims to be; the sum only keeps the reads from being optimised away.
@inline(never)
public func touch(_ buffer: UnsafeRawBufferPointer) -> UInt8 {
    buffer.reduce(0, &+)
}

/// A broken invariant is a finding: trap, so libFuzzer saves the input.
public func expect(_ condition: @autoclosure () -> Bool, _ what: @autoclosure () -> String) {
    if !condition() { fatalError("fuzz invariant broken: \(what())") }
}
