"""Tools the policy can call: the callback API, the sandboxed Python tool and search."""

from .base import Tool, ToolCall, ToolError, ToolOutput, ToolRegistry, ToolResult, ToolStats, tool
from .python import ISOLATION_LEVELS, PythonTool, SandboxResult, SandboxUnavailable, describe_isolation
from .search import (
    ARPOCacheBackend,
    BM25Backend,
    BM25Index,
    HTTPSearchBackend,
    SearchBackend,
    SearchCache,
    SearchCacheError,
    SearchHit,
    SearchTool,
    format_hits,
    normalize_query,
)

__all__ = [
    "ARPOCacheBackend",
    "BM25Backend",
    "BM25Index",
    "HTTPSearchBackend",
    "ISOLATION_LEVELS",
    "PythonTool",
    "SandboxResult",
    "SandboxUnavailable",
    "SearchBackend",
    "SearchCache",
    "SearchCacheError",
    "SearchHit",
    "SearchTool",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolResult",
    "ToolStats",
    "describe_isolation",
    "format_hits",
    "normalize_query",
    "tool",
]
