"""HTTP/1.1 engines: bytes in, events out, and back. No I/O and no policy here."""
