import Glibc

/// A file the system daemon was told to trust that someone other than root could change.
public struct TrustError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file as configured (the configuration file or a `Module=` path).
    public var file: String
    /// The path at fault: the file itself, a directory above it, or a symlink on the way.
    public var culprit: String
    /// What is wrong with `culprit`, for a person.
    public var reason: String

    public var description: String {
        culprit == file
            ? "\(file): not trusted: \(reason)"
            : "\(file): not trusted: \(culprit) \(reason)"
    }
}

/// Ownership checks for what the daemon reads and loads on the system bus (DESIGN §5:
/// backends come from root-owned configuration). Whoever can change the configuration file
/// or a module decides which code runs as the daemon and sees every PIN, so the file, every
/// directory above it and every symlink on the way, both as written and as resolved, must
/// belong to root and be writable by nobody else. A world-writable directory is accepted
/// only with the sticky bit (`/tmp`): there nobody but the owner (root, as checked) can
/// rename or replace the entry.
public enum ConfigurationTrust {
    /// Checks one file and the path leading to it.
    /// - Throws: ``TrustError`` naming `path` and the component at fault.
    public static func check(path: String) throws(TrustError) {
        let absolute = path.hasPrefix("/") ? path : currentDirectory() + "/" + path
        guard let resolved = realPath(absolute) else {
            throw TrustError(file: path, culprit: path, reason: "cannot be resolved (\(String(cString: strerror(errno))))")
        }
        // As written (lstat: a symlink in a directory root owns cannot be swapped by others,
        // but one elsewhere could) and as resolved (where the bytes really come from).
        for candidate in [absolute, resolved] {
            let parts = candidate.split(separator: "/").map(String.init)
            var prefix = ""
            for (index, part) in parts.enumerated() {
                prefix += "/" + part
                try checkComponent(prefix, file: path, last: index == parts.count - 1, followLinks: candidate == resolved)
            }
        }
        try checkComponent("/", file: path, last: false, followLinks: false)
    }

    /// The configuration file (at `path`) and every `Module=` path in it.
    public static func check(configuration: Configuration, loadedFrom path: String) throws(TrustError) {
        try check(path: path)
        for module in configuration.modules { try check(path: module) }
    }

    private static func checkComponent(_ component: String, file: String, last: Bool, followLinks: Bool) throws(TrustError) {
        var st = stat()
        let result = followLinks ? stat(component, &st) : lstat(component, &st)
        guard result == 0 else {
            throw TrustError(file: file, culprit: component, reason: "cannot be examined (\(String(cString: strerror(errno))))")
        }
        let type = st.st_mode & S_IFMT
        let kind = type == S_IFDIR ? "directory" : type == S_IFLNK ? "symlink" : "file"
        guard st.st_uid == 0 else {
            throw TrustError(file: file, culprit: component, reason: "(\(kind)) belongs to uid \(st.st_uid), not root")
        }
        // A symlink's own mode bits mean nothing; its owner and directory are what count.
        guard type != S_IFLNK else { return }
        if last && type != S_IFREG && followLinks {
            throw TrustError(file: file, culprit: component, reason: "is not a regular file")
        }
        let writableByOthers = st.st_mode & (S_IWGRP | S_IWOTH)
        let sticky = type == S_IFDIR && st.st_mode & S_ISVTX != 0
        if writableByOthers != 0 && !sticky {
            let mode = String(st.st_mode & 0o7777, radix: 8)
            throw TrustError(file: file, culprit: component, reason: "(\(kind)) is writable by group or others (mode \(mode))")
        }
    }

    private static func currentDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return "" }
        return String(cString: buffer)
    }

    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
