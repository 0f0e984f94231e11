"""Moving bytes: locations (uris), storage operations on them (storage, put_text
included), file hashing (hashing), the S3 client and its retries (s3), HTTP and
S3 downloads with resume (transfer), a content-addressed file cache (cache),
staging between a worker's disk and storage (staging), and refused writes (a full
disk, a read-only destination) as one line (writes). No step logic lives here;
io imports nothing of lmforge but errors and logs."""
