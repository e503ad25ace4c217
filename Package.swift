// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "dedupd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "dedupd", targets: ["dedupd"]),
        .library(name: "DedupCore", targets: ["DedupCore"]),
        .library(name: "DedupService", targets: ["DedupService"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        // System libraries from Debian: librdkafka-dev, libhiredis-dev and libssl-dev (TLS to Redis).
        .systemLibrary(
            name: "CRdKafka",
            pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"])]
        ),
        .systemLibrary(
            name: "CHiredis",
            pkgConfig: "hiredis",
            providers: [.apt(["libhiredis-dev"])]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        // Pure Swift: the logic, tested without servers.
        .target(
            name: "DedupCore",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        // The only two modules that touch C.
        .target(
            name: "KafkaIO",
            dependencies: [
                "CRdKafka",
                "DedupCore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "RedisIO",
            dependencies: [
                "CHiredis",
                "COpenSSL",
                "DedupCore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "DedupService",
            dependencies: [
                "DedupCore",
                "KafkaIO",
                "RedisIO",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // Real servers started for local runs: redis-server on a free port, temporary
        // directories, children spawned with a default signal mask (`dedupd demo`, `dedupd bench`,
        // tests), and the loopback clients that talk to them and to the worker's HTTP endpoint
        // (`dedupd healthcheck`). Not part of the library.
        .target(name: "LocalServers"),
        // `dedupd bench`: the worker against a bare consumer, in child processes.
        .target(
            name: "Bench",
            dependencies: [
                "DedupCore", "DedupService", "KafkaIO", "RedisIO", "LocalServers",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "dedupd",
            dependencies: [
                "DedupService",
                "RedisIO",
                "KafkaIO",
                "Bench",
                "LocalServers",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // A custom Swift `Handler` plugged into the worker, as a library user writes one.
        .executableTarget(
            name: "dedupd-example-handler",
            dependencies: [
                "DedupService",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Examples/CustomHandler"
        ),
        // A worker whose handler blocks its thread on purpose, for the watchdog's end-to-end test.
        .executableTarget(
            name: "dedupd-stalling-worker",
            dependencies: ["DedupService", .product(name: "Logging", package: "swift-log")],
            path: "Tests/Fixtures/StallingHandler"
        ),
        .testTarget(name: "DedupCoreTests", dependencies: ["DedupCore"]),
        .testTarget(name: "RedisIOTests", dependencies: ["RedisIO", "LocalServers", "TestSupport"]),
        .testTarget(name: "KafkaIOTests", dependencies: ["KafkaIO", "LocalServers", "TestSupport"]),
        .testTarget(name: "EndToEndTests", dependencies: [
            "DedupCore", "DedupService", "KafkaIO", "RedisIO", "LocalServers", "TestSupport", .product(name: "Yams", package: "Yams"),
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        // The worker in process with its handlers and dead-letter topic, against a real
        // redis-server and the librdkafka mock cluster.
        .testTarget(name: "DedupServiceTests", dependencies: [
            "DedupService", "KafkaIO", "RedisIO", "LocalServers", "TestSupport",
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        // The real worker loop and engine through seeded random schedules, against a simulated
        // log, store, handlers and clock: no servers.
        .testTarget(name: "WorkerModelTests", dependencies: [
            "DedupCore", "DedupService", .product(name: "Logging", package: "swift-log"),
        ]),
        // Configuration, stats, metrics and the HTTP endpoint, with a worker in this process.
        .testTarget(name: "OperationsTests", dependencies: [
            "DedupService", "KafkaIO", "RedisIO", "LocalServers", "TestSupport", .product(name: "Yams", package: "Yams"),
        ]),
        // Helpers shared by the test targets (the servers themselves are LocalServers').
        .target(name: "TestSupport", dependencies: [
            "LocalServers", .product(name: "Logging", package: "swift-log"),
        ], path: "Tests/TestSupport"),
    ]
)
