//! The one error type of this crate.

/// Everything that can be wrong with a region, a bitmap or a layout.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Mapping memory for a region failed.
    #[error("cannot map {len} bytes for a region")]
    Map {
        /// The size asked for.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An access outside a region. Checked before any byte is copied.
    #[error("{len} bytes at offset {offset} are outside the region of {region_len} bytes")]
    OutOfBounds {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The region's size.
        region_len: u64,
    },
    /// A bitmap whose word count does not fit the pages it should cover.
    #[error("bitmap of {found} words for {pages} pages, which need {expected}")]
    BitmapSize {
        /// Words received.
        found: usize,
        /// Words the pages need.
        expected: usize,
        /// Pages covered.
        pages: u64,
    },
    /// A bitmap that marks pages past the last one.
    #[error("bitmap marks pages past the last of {pages}")]
    BitmapExcess {
        /// Pages covered.
        pages: u64,
    },
    /// A bitmap of another number of pages than the memory it describes.
    #[error("bitmap of {found} pages for memory of {expected} pages")]
    BitmapPages {
        /// Pages of the bitmap.
        found: u64,
        /// Pages of the memory.
        expected: u64,
    },
    /// A guest memory layout that does not fit.
    #[error("invalid layout: {0}")]
    Layout(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
