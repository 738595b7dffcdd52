"""Chat clients: the protocol the engine speaks, the OpenAI SDK client and a fake for tests."""

from ._base import ChatClient, ChatRequest, ChatResponse, Message
from ._fake import FakeClient
from ._openai import OpenAIClient

__all__ = ["ChatClient", "ChatRequest", "ChatResponse", "FakeClient", "Message", "OpenAIClient"]
