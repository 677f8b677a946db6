"""The job queue and event bus: one interface, an in-process and a Redis Streams implementation."""

from backpropagate_services.common.queue.base import Event, Job, JobQueue, make_queue

__all__ = ["Event", "Job", "JobQueue", "make_queue"]
