"""V2 gRPC transport: the Open Inference Protocol over gRPC, as `tritonclient.grpc` speaks it."""
