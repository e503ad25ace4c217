import Testing
@testable import RedisIO

@Suite("RedisURL")
struct RedisURLTests {
    @Test func parsesHostPortAndDatabase() throws {
        let url = try RedisURL("redis://cache.internal:6380/3")
        #expect(url.host == "cache.internal")
        #expect(url.port == 6380)
        #expect(url.database == 3)
        #expect(url.user == nil)
        #expect(url.password == nil)
    }

    @Test func defaultsPortAndDatabase() throws {
        for text in ["redis://localhost", "redis://localhost/", "REDIS://localhost"] {
            let url = try RedisURL(text)
            #expect(url == RedisURL(host: "localhost", port: 6379, database: 0))
        }
    }

    @Test func parsesPasswordOnly() throws {
        let url = try RedisURL("redis://:s3cret@127.0.0.1")
        #expect(url.user == nil)
        #expect(url.password == "s3cret")
        #expect(url.port == 6379)
    }

    @Test func parsesUserAndPercentDecodedPassword() throws {
        let url = try RedisURL("redis://dedup%2Dworker:p%40ss%3Aw%2Frd@10.0.0.5:7000/15")
        #expect(url.user == "dedup-worker")
        #expect(url.password == "p@ss:w/rd")
        #expect(url.host == "10.0.0.5")
        #expect(url.port == 7000)
        #expect(url.database == 15)
    }

    /// An ACL user whose password comes from `redis.password` or `redis.password_file`.
    @Test func parsesUserWithoutPassword() throws {
        let url = try RedisURL("redis://dedupd@redis:6379/0")
        #expect(url.user == "dedupd" && url.password == nil && url.host == "redis")
    }

    @Test func parsesIPv6() throws {
        let url = try RedisURL("redis://[::1]:6390/2")
        #expect(url.host == "::1")
        #expect(url.port == 6390)
        #expect(url.redacted == "redis://[::1]:6390/2")
    }

    @Test func redissMeansTLS() throws {
        let url = try RedisURL("rediss://dedupd:pw@cache.example:6380/0")
        #expect(url.tls && url.host == "cache.example" && url.port == 6380 && url.user == "dedupd")
        #expect(url.redacted == "rediss://dedupd:***@cache.example:6380/0")
        #expect(try !RedisURL("redis://localhost").tls)
    }

    @Test(arguments: [
        ("localhost:6379", "scheme"),
        ("http://localhost", "scheme 'http'"),
        ("redis+tls://localhost", "scheme 'redis+tls'"),
        ("redis://", "host is missing"),
        ("redis://:pw@", "host is missing"),
        ("redis://localhost:0", "port '0'"),
        ("redis://localhost:99999", "port '99999'"),
        ("redis://localhost:abc", "port 'abc'"),
        ("redis://localhost/x", "database 'x'"),
        ("redis://localhost/-1", "database '-1'"),
        ("redis://:@localhost", "password is empty"),
        ("redis://:bad%zz@localhost", "password has an invalid percent-encoding"),
        ("redis://us%4:pw@localhost:1", "user name has an invalid percent-encoding"),
        ("redis://local host", "host 'local host'"),
        ("redis://localhost?db=1", "query"),
    ])
    func rejectsBadURLs(text: String, expected: String) throws {
        let error = try #require(throws: RedisError.self) { try RedisURL(text) }
        #expect(error.code == .invalidURL)
        #expect(error.message.contains(expected), "\(error.message)")
        #expect(!error.isRetriable)
    }

    @Test func redactionNeverShowsThePassword() throws {
        let url = try RedisURL("redis://alice:hunter2@db.example:6379/1")
        #expect(url.redacted == "redis://alice:***@db.example:6379/1")
        #expect(url.description == url.redacted)
        #expect("\(url)" == url.redacted)
        #expect(!String(reflecting: url).contains("hunter2"))
        var dumped = ""
        dump(url, to: &dumped)
        #expect(!dumped.contains("hunter2"))

        let passwordOnly = try RedisURL("redis://:hunter2@db.example")
        #expect(passwordOnly.redacted == "redis://:***@db.example:6379/0")
        #expect(try RedisURL("redis://db.example").redacted == "redis://db.example:6379/0")
    }

    @Test func errorsDoNotEchoThePassword() throws {
        let error = try #require(throws: RedisError.self) { try RedisURL("redis://:hunter2@db.example:notaport") }
        #expect(error.message.contains("port 'notaport'"))
        #expect(!error.message.contains("hunter2"))
        #expect(!error.description.contains("hunter2"))
    }

    @Test func durationsBecomeWholeMilliseconds() {
        #expect(RedisClaimStore.millis(.milliseconds(50)) == 50)
        #expect(RedisClaimStore.millis(.seconds(2)) == 2000)
        #expect(RedisClaimStore.millis(.microseconds(1500)) == 2)
        #expect(RedisClaimStore.millis(.zero) == 1)
        #expect(RedisClaimStore.millis(.nanoseconds(1)) == 1)
    }
}
