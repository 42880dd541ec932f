"""A small evaluator of the Go text/template subset that Ollama TEMPLATEs use, to render
chattune's Modelfile templates in tests (no Go, no Ollama here)."""

from __future__ import annotations

import json
import re


class GoTemplate:
    """The Go text/template subset Ollama TEMPLATEs here use: text, ``{{ .X }}``,
    ``{{ $.X }}``, ``{{ $v }}``, ``{{ $v := expr }}``, ``{{ $v = expr }}``, ``if``/``else
    if``/``else``/``end``, ``range``, the functions ``eq``, ``len``, ``print``, ``not`` and
    parenthesised calls, string and integer literals. Anything else raises."""

    def __init__(self, source: str):
        assert "{{-" not in source and "-}}" not in source
        parts = re.split(r"({{.*?}})", source, flags=re.S)
        self.tokens = [(p[2:-2].strip(), True) if p.startswith("{{") else (p, False) for p in parts if p]
        self.pos = 0
        self.body = self._block(("end", "else"))
        assert self.pos == len(self.tokens), "unbalanced {{ end }}"

    def _block(self, stops):
        nodes = []
        while self.pos < len(self.tokens):
            text, action = self.tokens[self.pos]
            if action and text.split()[0] in stops:
                return nodes
            self.pos += 1
            if not action:
                nodes.append(("text", text))
            elif text.startswith("if "):
                nodes.append(self._if(text[3:]))
            elif text.startswith("range "):
                body = self._block(("end",))
                self._expect("end")
                nodes.append(("range", text[6:], body))
            elif m := re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", text, re.S):
                nodes.append(("set", m[1], m[3]))
            else:
                nodes.append(("out", text))
        return nodes

    def _if(self, cond):
        branches = [(cond, self._block(("end", "else")))]
        while True:
            text, _ = self.tokens[self.pos]
            self.pos += 1
            if text == "end":
                return ("if", branches)
            if text.startswith("else if "):
                branches.append((text[8:], self._block(("end", "else"))))
            else:
                assert text == "else", text
                branches.append((None, self._block(("end",))))

    def _expect(self, word):
        assert self.tokens[self.pos] == (word, True), self.tokens[self.pos]
        self.pos += 1

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.body, data, data, {}, out)
        return "".join(out)

    def _run(self, nodes, dot, root, variables, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "out":
                out.append(str(self._eval(node[1], dot, root, variables)))
            elif node[0] == "set":
                variables[node[1]] = self._eval(node[2], dot, root, variables)
            elif node[0] == "range":
                for item in self._eval(node[1], dot, root, variables):
                    self._run(node[2], item, root, variables, out)
            else:
                for cond, body in node[1]:
                    if cond is None or self._truth(self._eval(cond, dot, root, variables)):
                        self._run(body, dot, root, variables, out)
                        break

    @staticmethod
    def _truth(value) -> bool:
        return bool(value)

    def _eval(self, expr, dot, root, variables):
        tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)
        value, rest = self._call(tokens, dot, root, variables)
        assert not rest, f"unparsed: {rest}"
        return value

    def _call(self, tokens, dot, root, variables):
        functions = {"eq": lambda a, b: a == b, "len": len, "not": lambda a: not a,
                     "print": lambda *a: "".join(map(str, a))}
        if tokens[0] in functions:
            args, rest = [], tokens[1:]
            while rest and rest[0] != ")":
                arg, rest = self._operand(rest, dot, root, variables)
                args.append(arg)
            return functions[tokens[0]](*args), rest
        return self._operand(tokens, dot, root, variables)

    def _operand(self, tokens, dot, root, variables):
        token, rest = tokens[0], tokens[1:]
        if token == "(":
            value, rest = self._call(rest, dot, root, variables)
            assert rest[0] == ")"
            return value, rest[1:]
        if token.startswith('"'):
            return json.loads(token), rest
        if token.isdigit():
            return int(token), rest
        if token.startswith("$."):
            return root[token[2:]], rest
        if token.startswith("$"):
            return variables[token], rest
        if token.startswith("."):
            return dot[token[1:]], rest
        raise AssertionError(f"unsupported: {token}")
