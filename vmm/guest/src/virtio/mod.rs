//! virtio 1.x over MMIO, polled: the transport ([`mmio`]) and split virtqueues
//! ([`queue`]). Guest virtual addresses equal guest physical ones, so buffer pointers
//! go into descriptors as they are.

pub mod mmio;
pub mod queue;
