// Cross-language check: a statically typed Go client generated from protos/ with protoc-gen-go and
// protoc-gen-go-grpc (its import path from the proto's go_package, no M flags).
// Usage: client ADDRESS MODEL IMAGE_PATH [CA_PEM (TLS)] -> one JSON line: models, Run events with typed boxes, and
// the structured errors (google.rpc.ErrorInfo reason, BadRequest field violations) of two bad Submits.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "github.com/florence2-serve/florence2-serve/gen/go/florence2/v1"
)

type box struct {
	Label          string  `json:"label"`
	X1, Y1, X2, Y2 float32 `json:"-"`
	Coords         []float32 `json:"coords"`
}

type callError struct {
	Code       string   `json:"code"`
	Reason     string   `json:"reason"`
	Domain     string   `json:"domain"`
	Violations []string `json:"violations"`
}

func structured(err error) callError {
	st, _ := status.FromError(err)
	out := callError{Code: st.Code().String()}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			out.Reason, out.Domain = d.Reason, d.Domain
		case *errdetails.BadRequest:
			for _, v := range d.FieldViolations {
				out.Violations = append(out.Violations, v.Field)
			}
		}
	}
	return out
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	address, model, imagePath := os.Args[1], os.Args[2], os.Args[3]
	image, err := os.ReadFile(imagePath)
	check(err)
	transport := grpc.WithInsecure()
	if len(os.Args) > 4 {
		tls, err := credentials.NewClientTLSFromFile(os.Args[4], "")
		check(err)
		transport = grpc.WithTransportCredentials(tls)
	}
	conn, err := grpc.Dial(address, transport)
	check(err)
	defer conn.Close()
	client := pb.NewFlorence2ServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	listed, err := client.ListModels(ctx, &pb.ListModelsRequest{})
	check(err)
	models := map[string]string{}
	for _, m := range listed.Models {
		models[m.Name] = m.Kind.String()
	}

	stream, err := client.Run(ctx, &pb.RunRequest{Job: &pb.JobSpec{Model: model, Task: pb.TaskType_TASK_TYPE_OD, Image: image}})
	check(err)
	types := []string{}
	boxes := []box{}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		check(err)
		types = append(types, msg.Event.Type.String())
		if msg.Event.Type == pb.EventType_EVENT_TYPE_DONE {
			for _, b := range msg.Event.Result.Boxes {
				boxes = append(boxes, box{Label: b.Label, Coords: []float32{b.X1, b.Y1, b.X2, b.Y2}})
			}
		}
	}

	_, unknown := client.Submit(ctx, &pb.SubmitRequest{Job: &pb.JobSpec{Model: "no-such-model", Task: pb.TaskType_TASK_TYPE_OD, Image: image}})
	_, badBeams := client.Submit(ctx, &pb.SubmitRequest{Job: &pb.JobSpec{Model: model, Task: pb.TaskType_TASK_TYPE_OD, Image: image,
		Generation: &pb.GenerationOptions{NumBeams: 99}}})

	out, err := json.Marshal(map[string]interface{}{
		"models": models, "types": types, "boxes": boxes,
		"unknown_model": structured(unknown), "bad_beams": structured(badBeams),
		"max_image_bytes": listed.Limits.GetMaxImageBytes(),
	})
	check(err)
	fmt.Println(string(out))
}
