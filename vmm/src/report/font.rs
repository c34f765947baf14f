//! The font of the plots: DejaVu Sans, embedded, so that PNG text needs no system fonts
//! (plotters' `ab_glyph` feature; its `ttf` feature would need fontconfig and freetype).
//! Its licence (Bitstream Vera, DejaVu changes public domain) is beside it in
//! `vmm/assets/fonts/`.

use std::sync::Once;

use plotters::style::{FontStyle, register_font};

/// DejaVu Sans 2.37, unmodified.
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the font as [`FONT`](super::draw::FONT), once per process. A font that does
/// not load (it always does: the bytes are fixed) leaves the text undrawable, which the
/// drawing reports as an error.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font(super::draw::FONT, FontStyle::Normal, DEJAVU_SANS).is_err() {
            tracing::warn!("the embedded DejaVu Sans font does not load; plots lose their text");
        }
    });
}
