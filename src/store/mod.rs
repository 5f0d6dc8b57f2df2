//! Block backends and durable LUN metadata. (implemented by the scsi/store helper)
