"""Infrastructure: storage (local paths and S3 through one filesystem, with retries and
deadlines), the Ray cluster connection and node checks, crash-safe temporary files, and the
checks a command runs in the driver before any worker starts."""
