//! The fuzz targets' bodies (`colo_netcmp::fuzzing`) on a few hundred random inputs, so
//! that the test command keeps them building and their invariants holding; the real fuzz
//! runs are `cargo fuzz run <target>` in netcmp/fuzz (README).

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn engine_ingest(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        colo_netcmp::fuzzing::engine_ingest(&data);
    }

    #[test]
    fn parse_frame(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        colo_netcmp::fuzzing::parse_frame(&data);
    }

    #[test]
    fn stream_frames(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        colo_netcmp::fuzzing::stream_frames(&data);
    }
}
