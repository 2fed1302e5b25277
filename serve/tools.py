"""
Tool calls on the OpenAI API, over a model whose chat format has no tool roles: how tools are described to it, how a
conversation with tool calls and tool results becomes nanochat's alternating turns, and how a call is read back.

The format (documented in the README):
- The tools are described at the top of the system message: a line of instructions, then one JSON line per tool,
  {"name", "description", "parameters"}.
- An assistant turn that called tools reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call
  (after its text, if it had any).
- Tool results read `<tool_result name="NAME">CONTENT</tool_result>`, one per `tool` message, in a user turn (with the
  user's next message, if one follows before the assistant speaks again).
- tool_choice "auto": a reply that is nothing but such <tool_call> blocks is returned as tool calls; any other reply
  is the answer. "required" or a named function: the call is generated under a JSON schema (the function's
  parameters; for "required", {"name", "arguments"} over every tool), so it always parses.
"""
import json
import uuid

from serve.protocol import ApiError, Message, text_of

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
INSTRUCTIONS = ("You can call these functions. To call one, reply with nothing but "
                f'{CALL_OPEN}{{"name": NAME, "arguments": {{...}}}}{CALL_CLOSE}.')


def check_tools(tools, tool_choice):
    """The request's tools and tool_choice -> (tools by name, mode): mode is None (no tools, or "none"), "auto",
    "required", or the name of the function it must call. ApiError 400 names what is wrong."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    by_name = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or \
                not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}",
                           param=f"tools.{i}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools.{i}.function.parameters")
        by_name[fn["name"]] = {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}
    if not by_name or tool_choice == "none":
        return by_name, None
    if tool_choice in (None, "auto", "required"):
        return by_name, tool_choice or "auto"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in by_name:
        raise ApiError(400, f"tool_choice must be 'none', 'auto', 'required' or a function among the tools "
                            f"({sorted(by_name)}), got {tool_choice!r}", param="tool_choice")
    return by_name, name


def describe(tools):
    return "\n".join([INSTRUCTIONS] + [json.dumps(t) for t in tools.values()])


def render(messages, tools):
    """OpenAI messages (with assistant tool_calls and tool results) -> nanochat's system / user / assistant messages,
    the tools described in the system message when there are any."""
    names, out = {}, []  # tool_call_id -> function name
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.get("function") or {}
                names[call.get("id")] = fn.get("name", "")
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, ValueError):
                    raise ApiError(400, f"message {i}: tool call arguments must be a JSON string",
                                   param=f"messages.{i}.tool_calls") from None
                calls.append(CALL_OPEN + json.dumps({"name": fn.get("name", ""), "arguments": arguments}) +
                             CALL_CLOSE)
            out.append(Message(role="assistant", content=text_of(m.content) + "".join(calls)))
        elif m.role == "tool":
            name = names.get(m.tool_call_id, m.name or "")
            result = f'<tool_result name="{name}">{text_of(m.content)}</tool_result>'
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_result>"):
                out[-1] = Message(role="user", content=out[-1].content + "\n" + result)
            else:
                out.append(Message(role="user", content=result))
        elif m.role == "user" and out and out[-1].role == "user" and out[-1].content.endswith("</tool_result>"):
            out[-1] = Message(role="user", content=out[-1].content + "\n" + text_of(m.content))
        else:
            out.append(m)
    if tools:
        if out and out[0].role == "system":
            out[0] = Message(role="system", content=describe(tools) + "\n\n" + text_of(out[0].content))
        else:
            out.insert(0, Message(role="system", content=describe(tools)))
    return out


def call_schema(tools, mode):
    """The JSON schema a forced call is generated under: the named function's parameters (the output is its
    arguments), or for "required" {"name", "arguments"} over every tool."""
    if mode in tools:
        return tools[mode]["parameters"]
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": t["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, t in tools.items()]}


def tool_call(name, arguments):
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def forced_calls(text, tools, mode):
    """The call a forced generation wrote (it parses: the grammar saw to it), or None when it was cut short."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if mode in tools:
        return [tool_call(mode, value)]
    return [tool_call(value["name"], value["arguments"])]


def parse_calls(text, tools):
    """tool_choice "auto": the calls of a reply that is nothing but <tool_call> blocks naming known tools, else None
    (the reply is an answer)."""
    calls, rest = [], text.strip()
    while rest.startswith(CALL_OPEN) and CALL_CLOSE in rest:
        body, rest = rest[len(CALL_OPEN):].split(CALL_CLOSE, 1)
        rest = rest.strip()
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in tools or not isinstance(value.get("arguments"),
                                                                                           dict):
            return None
        calls.append(tool_call(value["name"], value["arguments"]))
    return calls if calls and not rest else None


def may_be_call(text):
    """While a streamed "auto" reply could still turn out to be a tool call, its text is held back."""
    head = text.lstrip()
    return CALL_OPEN.startswith(head) or head.startswith(CALL_OPEN)
