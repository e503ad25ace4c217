import CHiredis

/// The hiredis version dedupd was built against. hiredis 0.14 has no runtime version call; its
/// soname (libhiredis.so.0.14) pins the minor version the binary loads.
public enum HiredisVersion {
    public static var string: String { "\(HIREDIS_MAJOR).\(HIREDIS_MINOR).\(HIREDIS_PATCH)" }
}
