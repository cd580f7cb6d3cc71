"""The toy Qwen2-VL: trained here on the synthetic task so the CPU default shows real accuracy trade-offs."""
