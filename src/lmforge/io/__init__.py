"""Moving bytes: locations (local paths, file://, s3://), storage operations on
them, atomic publishing, hashing, HTTP and S3 transfer with resume, and staging
between a worker's disk and storage. No step logic lives here."""
