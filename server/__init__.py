"""gRPC front end: validates requests, stores them in Redis, enqueues rq jobs, relays job streams. No torch."""
